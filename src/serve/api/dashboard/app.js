// The nexodus dashboard: plain JavaScript against /api/v1, no dependencies.
// The admin key comes from the form or the URL fragment (#key=…) and is kept in
// sessionStorage only; the fragment is removed from the address bar at once.
"use strict";

const KEY = "nexodus-admin-key";
const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let timer = null;

function key() { return sessionStorage.getItem(KEY); }

async function api(method, path, body) {
  const r = await fetch("/api/v1" + path, {
    method,
    headers: { "Authorization": "Bearer " + key(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (r.status === 401) { logout("the key was refused (wrong or revoked)"); throw new Error("unauthorized"); }
  if (r.status === 429) { throw new Error("too many failed attempts; wait a minute"); }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { throw new Error((data.error && data.error.message) || ("HTTP " + r.status)); }
  return data;
}

function org() { return $("org").value || "default"; }
function q() { return "?org=" + encodeURIComponent(org()); }

function ago(d) {
  if (d.online) return "online";
  const s = Math.max(0, Math.floor(Date.now() / 1000) - d.last_seen);
  if (s < 120) return s + " s ago";
  if (s < 7200) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h ago";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function renderTable(devices) {
  const tbody = $("devices").querySelector("tbody");
  tbody.replaceChildren();
  for (const d of devices) {
    const tr = document.createElement("tr");
    tr.dataset.name = d.name;
    tr.dataset.id = d.id;
    if (!d.online) tr.className = "offline";
    cell(tr, d.name);
    cell(tr, [d.tunnel_ip, d.tunnel_ip_v6].filter(Boolean).join("  "), "mono");
    cell(tr, d.online ? "online" : "offline", d.online ? "online" : "");
    cell(tr, d.endpoint || "-", "mono");
    cell(tr, ago(d));
    cell(tr, Object.entries(d.paths || {}).map(([p, how]) => p + ": " + how).join(", ") || "-");
    const td = cell(tr, "");
    const b = document.createElement("button");
    b.className = "remove";
    b.dataset.id = d.id;
    b.textContent = "remove";
    b.addEventListener("click", () => removeDevice(d));
    td.appendChild(b);
    tbody.appendChild(tr);
  }
}

function isRelay(d) { return !!(d.in_effect && d.in_effect.relay); }

// Devices on a circle (the relay in the middle); an edge per pair that reports a
// direct path, a dashed edge to the relay for each device reached through it.
function renderGraph(devices) {
  const svg = $("graph");
  svg.replaceChildren();
  const W = 600, H = 420, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 50;
  const relay = devices.find((d) => isRelay(d) && d.online) || devices.find(isRelay);
  const ring = devices.filter((d) => d !== relay);
  const pos = new Map();
  ring.forEach((d, i) => {
    const a = (2 * Math.PI * i) / Math.max(1, ring.length) - Math.PI / 2;
    pos.set(d.name, [cx + R * Math.cos(a), cy + R * Math.sin(a)]);
  });
  if (relay) pos.set(relay.name, [cx, cy]);
  const byName = new Map(devices.map((d) => [d.name, d]));
  const edges = new Map();
  for (const d of devices) {
    for (const [peer, how] of Object.entries(d.paths || {})) {
      if (!pos.has(peer)) continue;
      if (how === "direct") {
        const k = [d.name, peer].sort().join("\u0000");
        edges.set(k, { a: d.name, b: peer, cls: "direct" });
      } else if (how === "relay" && relay && d.name !== relay.name && peer !== relay.name) {
        const k = "relay\u0000" + [d.name, peer].sort().join("\u0000");
        edges.set(k, { a: d.name, b: peer, cls: "relay" });
      }
    }
  }
  for (const e of edges.values()) {
    const [x1, y1] = pos.get(e.a), [x2, y2] = pos.get(e.b);
    if (e.cls === "relay") {
      // A relayed pair: a dashed curve from one to the other, bent through the relay.
      const [rx, ry] = pos.get(relay.name);
      const c = document.createElementNS(SVG, "path");
      c.setAttribute("d", `M ${x1} ${y1} Q ${2 * rx - (x1 + x2) / 2} ${2 * ry - (y1 + y2) / 2} ${x2} ${y2}`);
      c.setAttribute("class", "relay");
      c.dataset.a = e.a; c.dataset.b = e.b;
      svg.appendChild(c);
      continue;
    }
    const l = document.createElementNS(SVG, "line");
    l.setAttribute("x1", x1); l.setAttribute("y1", y1);
    l.setAttribute("x2", x2); l.setAttribute("y2", y2);
    l.setAttribute("class", e.cls);
    l.dataset.a = e.a; l.dataset.b = e.b;
    svg.appendChild(l);
  }
  for (const [name, [x, y]] of pos) {
    const d = byName.get(name);
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", 16);
    const cls = [];
    if (relay && d === relay) cls.push("relay-node");
    if (!d.online) cls.push("offline");
    c.setAttribute("class", cls.join(" "));
    c.dataset.name = name;
    const title = document.createElementNS(SVG, "title");
    title.textContent = name + " " + d.tunnel_ip + (d.online ? "" : " (offline)");
    c.appendChild(title);
    svg.appendChild(c);
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y + 32);
    if (!d.online) t.setAttribute("class", "offline");
    t.textContent = name + (relay && d === relay ? " (relay)" : "");
    svg.appendChild(t);
  }
}

async function refresh() {
  try {
    const devices = await api("GET", "/devices" + q());
    renderTable(devices);
    renderGraph(devices);
    const online = devices.filter((d) => d.online).length;
    $("status").textContent = devices.length + " devices, " + online + " online · updated " +
      new Date().toLocaleTimeString();
  } catch (e) {
    $("status").textContent = "refresh failed: " + e.message;
  }
}

async function loadOrgs() {
  const orgs = await api("GET", "/orgs");
  const sel = $("org");
  const was = sel.value;
  sel.replaceChildren();
  for (const o of orgs) {
    const opt = document.createElement("option");
    opt.value = o.name; opt.textContent = o.name;
    sel.appendChild(opt);
  }
  sel.value = was || "default";
  $("org-label").hidden = orgs.length < 2;
}

async function removeDevice(d) {
  if (!confirm("Remove device " + d.name + " (" + d.tunnel_ip + ") from the mesh?")) return;
  try {
    await api("DELETE", "/devices/" + d.id + q());
  } catch (e) {
    alert("could not remove " + d.name + ": " + e.message);
  }
  refresh();
}

async function createToken(ev) {
  ev.preventDefault();
  const out = $("token-output");
  out.textContent = "";
  const expires = $("token-expires").value.trim();
  try {
    const t = await api("POST", "/tokens", {
      org: org(),
      reusable: $("token-reusable").checked,
      expires: expires === "" ? null : expires,
    });
    out.textContent = t.token;
  } catch (e) {
    out.textContent = "error: " + e.message;
  }
}

function logout(why) {
  sessionStorage.removeItem(KEY);
  if (timer) clearInterval(timer);
  timer = null;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login-box").hidden = false;
  $("login-error").textContent = why || "";
}

async function start() {
  $("login-box").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  try { await loadOrgs(); } catch (e) { return; }
  await refresh();
  if (!timer) timer = setInterval(refresh, REFRESH_MS);
}

// A key in the fragment goes to session storage and out of the address bar.
function takeFragment() {
  const m = location.hash.match(/key=([^&]+)/);
  if (!m) return false;
  sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function init() {
  takeFragment();
  window.addEventListener("hashchange", () => { if (takeFragment()) start(); });
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("key").value.trim();
    if (!k.startsWith("nxa1.")) { $("login-error").textContent = "an admin key starts with nxa1."; return; }
    sessionStorage.setItem(KEY, k);
    $("key").value = "";
    $("login-error").textContent = "";
    start();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("org").addEventListener("change", refresh);
  $("token-form").addEventListener("submit", createToken);
  if (key()) start();
}

init();
