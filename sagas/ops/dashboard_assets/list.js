const STATES=["PENDING","WAITING","RUNNING","COMPENSATING","COMPLETED","COMPENSATED",
 "COMPENSATION_FAILED","FORWARD_FAILED"];
const params=new URLSearchParams(location.search);
const filter=document.getElementById("state-filter"),search=document.getElementById("search");
const nameFilter=document.getElementById("name-filter");
const stalledFilter=document.getElementById("stalled-filter");
const versionFilter=document.getElementById("version-filter");
versionFilter.value=params.get("version")||"";
for(const s of STATES)filter.append(el("option",{value:s,text:s}));
filter.value=params.get("state")||"";search.value=params.get("q")||"";
stalledFilter.checked=params.get("stalled")==="true";
let wantedName=params.get("name")||"";
function setNames(names){
 const have=[...nameFilter.options].map(o=>o.value).slice(1);
 if(have.join("\n")===names.join("\n"))return;
 const keep=nameFilter.value||wantedName;
 nameFilter.replaceChildren(el("option",{value:"",text:"all sagas"}),
  ...names.map(n=>el("option",{value:n,text:n})));
 nameFilter.value=names.includes(keep)?keep:"";}
if(wantedName)setNames([wantedName]);
let timer=null;
async function refresh(){
 clearTimeout(timer);
 const q=new URLSearchParams();if(filter.value)q.set("state",filter.value);
 const name=nameFilter.value||wantedName;if(name)q.set("name",name);
 if(stalledFilter.checked)q.set("stalled","true");
 if(versionFilter.value)q.set("version",versionFilter.value);
 if(search.value.trim())q.set("q",search.value.trim());
 history.replaceState(null,"",q.toString()?`?${q}`:location.pathname);
 try{
  const data=await getJSON(`/dashboard/api/sagas?${q}`);
  setNames(data.names);wantedName="";
  const counts=document.getElementById("counts");counts.replaceChildren();
  for(const s of STATES){const c=el("div",{class:"count"+(filter.value===s?" active":""),
    "data-state":s},el("b",{text:String(data.counts[s]||0)}),badge(s));
   c.onclick=()=>{filter.value=filter.value===s?"":s;refresh();};counts.append(c);}
  document.getElementById("stalled-count").textContent=`(${data.stalled})`;
  document.getElementById("total").textContent=`${data.total} shown by filter`;
  const rows=document.getElementById("rows");rows.replaceChildren();
  for(const s of data.sagas){rows.append(el("tr",{"data-saga-id":s.id,
    "data-stalled":String(s.stalled)},
   el("td",{},el("a",{href:`/dashboard/sagas/${encodeURIComponent(s.id)}`,text:s.id})),
   el("td",{text:s.name}),el("td",{class:"version",text:`v${s.version}`}),
   el("td",{},badge(s.state),s.stalled?" ":null,
    s.stalled?el("span",{class:"badge stalled",text:"stalled"}):null),
   el("td",{text:when(s.created_at)}),el("td",{class:"age",text:dur(s.age_s)}),
   el("td",{class:"duration",text:dur(s.duration_s)}),
   el("td",{text:when(s.updated_at)}),el("td",{class:"err",text:s.error||""})));}
 }catch(e){console.warn(e);}
 timer=setTimeout(refresh,2000);
}
filter.onchange=refresh;nameFilter.onchange=refresh;stalledFilter.onchange=refresh;
versionFilter.onchange=refresh;
let typing=null;search.oninput=()=>{clearTimeout(typing);typing=setTimeout(refresh,250);};
refresh();
