"use strict";
const SETTLED=new Set(["COMPLETED","COMPENSATED"]);
function el(tag,attrs,...kids){const e=document.createElement(tag);
 for(const[k,v]of Object.entries(attrs||{})){if(v===null||v===undefined||v===false)continue;
  if(k==="text")e.textContent=v;else e.setAttribute(k,v===true?"":v);}
 for(const k of kids)if(k!==null&&k!==undefined)e.append(k);return e;}
function badge(state){return el("span",{class:"badge","data-state":state,text:state});}
function when(iso){return iso?new Date(iso).toLocaleTimeString([],{hour12:false,
 hour:"2-digit",minute:"2-digit",second:"2-digit",fractionalSecondDigits:3}):"";}
function dur(s){if(s===null||s===undefined)return"";s=Math.max(0,s);
 if(s<1)return`${Math.round(s*1000)} ms`;if(s<10)return`${s.toFixed(1)} s`;
 if(s<60)return`${Math.round(s)} s`;const m=Math.floor(s/60);
 if(m<60)return`${m} min ${Math.floor(s%60)} s`;const h=Math.floor(m/60);
 if(h<24)return`${h} h ${m%60} min`;return`${Math.floor(h/24)} d ${h%24} h`;}
async function getJSON(url){const r=await fetch(url,{cache:"no-store"});
 if(!r.ok){const e=new Error(`${r.status} ${url}`);e.status=r.status;throw e;}return r.json();}
