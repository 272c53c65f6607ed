const sagaId=decodeURIComponent(location.pathname.split("/").pop());
const api=`/dashboard/api/sagas/${encodeURIComponent(sagaId)}`;
const $=id=>document.getElementById(id);
const drawn={graph:null,timeline:null};
function fit(root){
 // The server sizes each box to its text; should this browser's font still be wider, the
 // line is shrunk into its box rather than spilling over its edge.
 for(const t of root.querySelectorAll("text[data-room]")){const room=+t.dataset.room;
  if(t.getComputedTextLength()>room+0.5){t.setAttribute("textLength",String(room));
   t.setAttribute("lengthAdjust","spacingAndGlyphs");t.dataset.squeezed="true";}}}
function picture(id,svg){if(drawn[id]===svg)return;drawn[id]=svg;
 const box=$(id==="graph"?"graph":"timeline-chart");box.innerHTML=svg;fit(box);}
function room(){const w=$("timeline-chart").clientWidth||$("graph").clientWidth;
 return Math.max(320,Math.floor((w||1100)-2));}
function drawTable(items){
 const body=$("timeline");body.replaceChildren();
 for(const it of items){
  // the task id less the saga id the header shows: "b.undo.1"; the whole id is its title
  const short=it.task_id&&it.task_id.startsWith(`${sagaId}.`)?
   it.task_id.slice(sagaId.length+1):it.task_id;
  const link=it.flower?el("a",{href:it.flower,target:"_blank",rel:"noopener noreferrer",
   title:`${it.task_id} in Flower`,text:short}):"";
  const took=it.started_at&&it.ended_at&&it.phase!=="skipped"?
   dur((new Date(it.ended_at)-new Date(it.started_at))/1000):"";
  body.append(el("tr",{"data-step":it.step,"data-phase":it.phase,"data-outcome":it.outcome},
   el("td",{text:it.step}),el("td",{text:it.phase+(it.redrive?" (re-drive)":"")}),
   el("td",{text:String(it.attempt)}),
   el("td",{class:"time",text:when(it.started_at)}),el("td",{class:"time",text:when(it.ended_at)}),
   el("td",{class:"time",text:took}),el("td",{text:it.outcome.replace("_"," ")}),el("td",{class:"err",text:it.error||""}),
   el("td",{},link)));}
}
function legend(items){const box=$("timeline-legend");if(box.childElementCount)return;
 for(const[colour,label]of items){const s=el("span",{class:"swatch"});
  s.style.background=colour;box.append(el("span",{class:"key"},s,label)," ");}}
function setAction(button,rule){button.disabled=!rule.allowed;button.title=rule.why;}
let timer=null,gone=false;
async function refresh(){
 clearTimeout(timer);if(gone)return;
 let delay=1000;
 try{
  const v=await getJSON(`${api}?width=${room()}&tzo=${new Date().getTimezoneOffset()}`);
  document.title=`${v.name} ${v.state} · sagas`;
  $("saga-name").textContent=`${v.name} v${v.version}`;
  $("saga-state").replaceChildren(badge(v.state));
  $("saga-stalled").replaceChildren(v.stalled?el("span",{class:"badge stalled",
   text:"stalled"}):"");
  $("saga-id").textContent=v.id;
  $("saga-live").textContent=v.live?"live: updates every second":"";
  $("saga-error").textContent=v.error||"";
  const held=v.locks||{holds:[],waits:[]},locks=$("saga-locks");
  locks.hidden=!held.holds.length&&!held.waits.length;
  locks.textContent=[held.holds.length?`Holds semantic locks: ${held.holds.join(", ")}.`:"",
   ...held.waits.map(k=>`Waits for key ${k}, held by another saga (sagas locks ${k}).`)]
   .filter(Boolean).join(" ");
  const stall=$("stall-reason");stall.hidden=!v.stalled;
  stall.textContent=v.stalled?`Stalled: ${v.stalled.reason}.`:"";
  picture("graph",v.graph_svg);picture("timeline",v.timeline_svg);
  legend(v.timeline_legend||[]);drawTable(v.timeline);
  setAction($("retry-button"),v.actions.retry);setAction($("cancel-button"),v.actions.cancel);
  $("context").textContent=JSON.stringify(v.context,null,2);
  if(SETTLED.has(v.state))delay=10000;
 }catch(e){console.warn(e);
  if(e.status===404){gone=true;$("saga-error").textContent="This saga no longer exists.";return;}
  $("saga-error").textContent=String(e);delay=3000;}
 timer=setTimeout(refresh,delay);
}
function say(text,bad){const out=$("action-result");out.textContent=text;
 out.classList.toggle("bad",!!bad);}
async function act(action){
 const token=$("admin-token").value;
 if(!token){say("Type the admin token first.",true);$("admin-token").focus();return;}
 say(`${action}…`);
 try{
  const r=await fetch(`${api}/${action}`,{method:"POST",cache:"no-store",credentials:"omit",
   referrerPolicy:"no-referrer",headers:{"Authorization":`Bearer ${token}`}});
  let body={};try{body=await r.json();}catch(_){body={};}
  const detail=typeof body.detail==="string"?body.detail:JSON.stringify(body.detail||"");
  if(r.ok)say(`${action}: the saga is ${body.state}${body.note?` (${body.note})`:""}.`);
  else say(`${action} refused (${r.status}): ${detail||r.statusText}`,true);
 }catch(e){say(`${action} failed: ${e.message}`,true);}
 refresh();
}
$("actions").addEventListener("submit",e=>e.preventDefault());
$("retry-button").onclick=()=>act("retry");
let armed=null;
$("cancel-button").onclick=()=>{const b=$("cancel-button");
 if(!armed){b.classList.add("armed");b.textContent="Click again to cancel";
  armed=setTimeout(()=>{armed=null;b.classList.remove("armed");b.textContent="Cancel saga";},
   5000);return;}
 clearTimeout(armed);armed=null;b.classList.remove("armed");b.textContent="Cancel saga";
 act("cancel");};
let resizing=null;
window.addEventListener("resize",()=>{clearTimeout(resizing);resizing=setTimeout(refresh,300);});
refresh();
