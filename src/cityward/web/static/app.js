// cityward operations room: one page, no build step. It logs in with a token, reads the
// city's entities through the NGSI-LD API, follows /dashboard/v1/events (server-sent events
// read with fetch, since EventSource cannot send an Authorization header) and draws them
// with MapLibre GL JS and Chart.js, both served by cityward itself from PyPI wheels.
"use strict";

const CFG = JSON.parse(document.getElementById("cw-config").textContent || "{}");
const NGSI = "/ngsi-ld/v1";
const TYPES = [
  "TrafficSignal", "TrafficFlowObserved", "EmergencyVehicleRun", "Alert",
  "AirQualityObserved", "NoiseLevelObserved", "WeatherObserved", "Device",
  "KeyPerformanceIndicator", "Camera",
];
const SENSOR_TYPES = new Set(["AirQualityObserved", "NoiseLevelObserved", "WeatherObserved", "Device"]);
const HISTORY_HOURS = 3;
const TOKEN_KEY = "cityward.token";

const S = {
  token: null,
  me: null,
  entities: new Map(), // id -> keyValues entity
  map: null,
  mapReady: false,
  fitted: false,
  rate: null,
  selected: null,
  chart: null,
  chartAttrs: [],
  dirty: new Set(),
  frame: 0,
  stream: null, // AbortController of the live stream
  streamGen: 0,
  lastEvent: 0,
  counts: {}, // features drawn per map source (the browser tests read them)
};
window.cityward = { state: S }; // for the browser tests and the curious

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// -- the API ------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, problem) {
    const field = problem && problem.field ? ` (${problem.field})` : "";
    super(((problem && (problem.detail || problem.title)) || `HTTP ${status}`) + field);
    this.status = status;
    this.problem = problem;
  }
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const h = { Accept: "application/json", ...headers };
  if (S.token) h.Authorization = `Bearer ${S.token}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401 && S.me) {
    logout("Your token was refused (expired or revoked): log in again.");
    throw new ApiError(401, null);
  }
  if (!r.ok) {
    let problem = null;
    try { problem = await r.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, problem);
  }
  if (r.status === 204) return { data: null, headers: r.headers };
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  // 207: a write of several attributes where some were not written. Reporting it as done
  // would tell an operator that an override or an acknowledgement is in the bank when it is not
  if (r.status === 207 && data && Array.isArray(data.notUpdated) && data.notUpdated.length) {
    const why = data.notUpdated.map((n) => `${n.attributeName}: ${n.reason}`).join("; ");
    throw new ApiError(207, { detail: `not written (${why})` });
  }
  return { data, headers: r.headers };
}

// PATCH updates attributes the entity has; POST (append) also adds new ones, such as the
// first comment on an alert
function writeAttrs(id, attrs, method = "PATCH") {
  const body = {};
  for (const [k, v] of Object.entries(attrs)) body[k] = { type: "Property", value: v };
  return api(`${NGSI}/entities/${encodeURIComponent(id)}/attrs`, { method, body });
}

// -- values -------------------------------------------------------------------------------
const shortType = (e) => (Array.isArray(e.type) ? e.type[0] : e.type) || "";
function plain(v) { // keyValues DateTime objects and the like
  if (v && typeof v === "object" && "@value" in v) return v["@value"];
  return v;
}
function fmtTime(v) {
  const t = Date.parse(plain(v));
  return Number.isFinite(t) ? new Date(t).toLocaleTimeString() : String(plain(v) ?? "");
}
function fmt(v) {
  v = plain(v);
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
// a value as text, whatever its shape: an entity written by any client reaches every operator's
// page, and one name or source that is not a string must not stop the page drawing the others
function asText(v) {
  v = plain(v);
  if (typeof v === "string") return v;
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  // a LanguageProperty: keyValues gives {languageMap: {en: ..., fr: ...}}
  const map = v && typeof v === "object" ? v.languageMap : null;
  if (map && typeof map === "object") {
    const lang = navigator.language.split("-")[0];
    const s = typeof map[lang] === "string" ? map[lang] : Object.values(map).find((x) => typeof x === "string");
    if (s) return s;
  }
  return "";
}
const arr = (v) => (Array.isArray(v) ? v : []);
const title = (e) => asText(e.name) || String(e.id).split(":").slice(-1)[0];
const isOpenAlert = (e) => shortType(e) === "Alert" && plain(e.alertStatus) !== "closed";
const isActiveRun = (e) => shortType(e) === "EmergencyVehicleRun" && plain(e.runStatus) === "en-route";
function signalColor(state) {
  const s = String(state || "");
  if (/[yY]/.test(s)) return "#f5c518";
  if (/[gG]/.test(s)) return "#2ecc71";
  return "#e74c3c";
}

// -- login --------------------------------------------------------------------------------
async function login(token) {
  S.token = token;
  let me;
  try {
    me = (await api("/cityward/v1/whoami")).data;
  } catch (err) {
    S.token = null;
    throw err.status === 401 ? new Error("This token is not valid (expired, revoked or mistyped).") : err;
  }
  if (!me.permissions.includes("data:read")) {
    S.token = null;
    throw new Error(`A ${me.role} token cannot read city data. Use an operator's or analyst's token.`);
  }
  S.me = me;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("room").hidden = false;
  $("kpis").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = `${me.subject} · ${me.role}`;
  await loadScript("/ui/maplibre-gl.js", "maplibregl");
  initMap();
  await loadAll();
  follow();
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (S.stream) S.stream.abort();
  S.token = null;
  S.me = null;
  S.entities.clear();
  // nothing of this operator's session reaches the next one at this screen: a half-typed
  // comment, the lists (hidden, not emptied) and the open details
  commentDrafts.clear();
  signalRows.clear();
  S.selected = null;
  if (S.chart) { S.chart.destroy(); S.chart = null; }
  for (const id of ["alerts", "signals", "entity-attrs"]) $(id).replaceChildren();
  $("entity-title").textContent = "";
  $("entity-id").textContent = "";
  $("room").hidden = true;
  $("kpis").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

const loading = new Map();
function loadScript(src, global) {
  if (window[global]) return Promise.resolve();
  if (!loading.has(src)) {
    loading.set(src, new Promise((resolve, reject) => {
      const s = el("script", { src });
      s.onload = resolve;
      s.onerror = () => reject(new Error(`cannot load ${src}`));
      document.head.append(s);
    }));
  }
  return loading.get(src);
}

// -- state ---------------------------------------------------------------------------------
// the server's largest page (max_limit, in the page's config), 1000 at most
const PAGE = Math.max(1, Math.min(1000, Number(CFG.maxLimit) || 1000));
async function loadAll() {
  const seen = new Map();
  await Promise.all(TYPES.map(async (type) => {
    let q = "";
    // an alert without alertStatus is open (isOpenAlert): alertStatus!="closed" alone does not
    // match it, and it vanished from the panel at the next reload
    if (type === "Alert") q = `&q=${encodeURIComponent('!alertStatus|alertStatus!="closed"')}`;
    if (type === "EmergencyVehicleRun") q = `&q=${encodeURIComponent('runStatus=="en-route"')}`;
    for (let offset = 0; offset < 20000; offset += PAGE) {
      let page;
      try {
        page = (await api(`${NGSI}/entities?type=${type}&options=keyValues&limit=${PAGE}&offset=${offset}${q}`)).data;
      } catch (err) {
        // a data source this token's purposes may not read; any other refusal (a page size
        // above the server's maximum among them) is an error to show, not an empty city
        const missing = err.status === 403 && err.problem && err.problem.missingPermission;
        if (typeof missing === "string" && missing.startsWith("purpose:")) return;
        throw err;
      }
      for (const e of page) seen.set(e.id, e);
      if (page.length < PAGE) return;
    }
  }));
  S.entities = seen;
  markAll();
}

function upsert(e) {
  S.entities.set(e.id, e);
  mark(shortType(e));
  if (S.selected === e.id) { S.dirty.add("entity"); appendChart(e); }
}

function remove(id) {
  const e = S.entities.get(id);
  if (!e) return;
  S.entities.delete(id);
  mark(shortType(e));
}

function mark(type) {
  if (type === "TrafficFlowObserved") S.dirty.add("roads");
  else if (type === "TrafficSignal") { S.dirty.add("signals"); S.dirty.add("signalTable"); }
  else if (type === "EmergencyVehicleRun") { S.dirty.add("evs"); S.dirty.add("kpi"); }
  else if (type === "Alert") { S.dirty.add("alerts"); S.dirty.add("alertPanel"); S.dirty.add("kpi"); S.dirty.add("sensors"); }
  else if (type === "KeyPerformanceIndicator") S.dirty.add("kpi");
  else if (type === "Camera") S.dirty.add("cameras");
  else if (SENSOR_TYPES.has(type)) S.dirty.add("sensors");
  schedule();
}
function markAll() {
  for (const k of ["roads", "signals", "signalTable", "evs", "alerts", "alertPanel", "kpi", "sensors", "cameras", "entity"]) S.dirty.add(k);
  schedule();
}
function schedule() {
  if (!S.frame) S.frame = requestAnimationFrame(render);
}

// -- the live stream ---------------------------------------------------------------------------
async function follow() {
  const gen = ++S.streamGen;
  let delay = 1000;
  while (S.token && gen === S.streamGen) {
    const ctl = new AbortController();
    S.stream = ctl;
    try {
      const r = await fetch(`/dashboard/v1/events?type=${TYPES.join(",")}`, {
        headers: { Authorization: `Bearer ${S.token}`, Accept: "text/event-stream" },
        signal: ctl.signal,
      });
      if (r.status === 401) { logout("Your token was refused: log in again."); return; }
      if (!r.ok) throw new Error(`live stream: HTTP ${r.status}`);
      setStreamState(true);
      delay = 1000;
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          if (onEvent(block) === "reload") { await loadAll(); }
        }
      }
    } catch (err) {
      if (ctl.signal.aborted) return;
    }
    setStreamState(false);
    await new Promise((res) => setTimeout(res, delay));
    delay = Math.min(delay * 2, 15000);
    if (S.token && gen === S.streamGen) await loadAll().catch(() => {});
  }
}

function onEvent(block) {
  let event = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  S.lastEvent = Date.now();
  const payload = data ? JSON.parse(data) : null;
  if (event === "entity") upsert(payload);
  else if (event === "delete") remove(payload.id);
  else if (event === "stats") { S.rate = payload.ingestRate; S.dirty.add("kpi"); schedule(); }
  else if (event === "reload") return "reload";
  return event;
}

function setStreamState(live) {
  $("kpi-rate").classList.toggle("stale", !live);
}

// -- the map -------------------------------------------------------------------------------------
const EMPTY = { type: "FeatureCollection", features: [] };
const LAYER_GROUPS = {
  roads: ["roads"], signals: ["signals"], sensors: ["sensors"], cameras: ["cameras"],
  alerts: ["alerts"], evs: ["ev-routes", "evs"],
};

function initMap() {
  if (S.map) return;
  const style = {
    version: 8,
    sources: {},
    layers: [{ id: "background", type: "background", paint: { "background-color": "#101820" } }],
  };
  if (CFG.tiles) {
    style.sources.tiles = { type: "raster", tiles: [CFG.tiles], tileSize: 256, attribution: CFG.attribution || "" };
    style.layers.push({ id: "tiles", type: "raster", source: "tiles", paint: { "raster-opacity": 0.6 } });
  }
  const map = new maplibregl.Map({
    container: "map", style, center: [0, 0], zoom: 1, attributionControl: false,
    fadeDuration: 0, maxPitch: 0, dragRotate: false,
  });
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
  map.addControl(new maplibregl.ScaleControl(), "bottom-left");
  if (CFG.tiles) map.addControl(new maplibregl.AttributionControl({ compact: true }));
  S.map = map;
  map.on("load", () => {
    // symbols grow with the page's type (a 4K wall is read from across the room)
    const k = parseFloat(getComputedStyle(document.documentElement).fontSize) / 15 || 1;
    for (const id of ["roads", "ev-routes", "signals", "sensors", "cameras", "alerts", "evs"]) {
      map.addSource(id, { type: "geojson", data: EMPTY });
    }
    map.addLayer({
      id: "roads", type: "line", source: "roads",
      layout: { "line-cap": "round" },
      paint: {
        "line-width": ["interpolate", ["linear"], ["zoom"], 12, 2 * k, 17, 7 * k],
        "line-color": ["case", ["<", ["get", "occ"], 0], "#4b5563",
          ["interpolate", ["linear"], ["get", "occ"], 0, "#22c55e", 0.15, "#eab308", 0.3, "#f97316", 0.5, "#dc2626"]],
      },
    });
    map.addLayer({
      id: "ev-routes", type: "line", source: "ev-routes",
      paint: { "line-color": "#38bdf8", "line-width": 5 * k, "line-opacity": 0.7, "line-dasharray": [1, 1] },
    });
    map.addLayer({
      id: "signals", type: "circle", source: "signals",
      paint: {
        "circle-radius": ["interpolate", ["linear"], ["zoom"], 12, 4 * k, 17, 10 * k],
        "circle-color": ["get", "color"],
        "circle-stroke-color": ["case", ["get", "override"], "#ffffff", "#0b1118"],
        "circle-stroke-width": ["case", ["get", "override"], 3 * k, k],
      },
    });
    map.addLayer({
      id: "sensors", type: "circle", source: "sensors",
      paint: {
        "circle-radius": 7 * k,
        "circle-color": ["case", ["get", "alert"], "#ef4444", "#a78bfa"],
        "circle-stroke-color": "#0b1118", "circle-stroke-width": 1.5 * k,
      },
    });
    map.addLayer({
      id: "cameras", type: "circle", source: "cameras",
      paint: { "circle-radius": 7 * k, "circle-color": "#f472b6", "circle-stroke-color": "#0b1118", "circle-stroke-width": 1.5 * k },
    });
    map.addLayer({
      id: "alerts", type: "circle", source: "alerts",
      paint: {
        "circle-radius": 13 * k, "circle-color": "rgba(239,68,68,0.25)",
        "circle-stroke-color": "#ef4444", "circle-stroke-width": 3 * k,
      },
    });
    map.addLayer({
      id: "evs", type: "circle", source: "evs",
      paint: { "circle-radius": 8 * k, "circle-color": "#38bdf8", "circle-stroke-color": "#ffffff", "circle-stroke-width": 2.5 * k },
    });
    for (const layer of ["roads", "signals", "sensors", "cameras", "alerts", "evs"]) {
      map.on("click", layer, (ev) => { if (ev.features.length) select(ev.features[0].properties.id); });
      map.on("mouseenter", layer, () => { map.getCanvas().style.cursor = "pointer"; });
      map.on("mouseleave", layer, () => { map.getCanvas().style.cursor = ""; });
    }
    S.mapReady = true;
    markAll();
  });
  for (const box of document.querySelectorAll(".legend input[data-layer]")) {
    box.addEventListener("change", () => {
      for (const id of LAYER_GROUPS[box.dataset.layer]) {
        if (S.map.getLayer(id)) S.map.setLayoutProperty(id, "visibility", box.checked ? "visible" : "none");
      }
    });
  }
}

function feature(e, geometry, props) {
  return { type: "Feature", geometry, properties: { id: e.id, ...props } };
}
function located(e) {
  const g = e.location;
  return g && typeof g === "object" && g.type && g.coordinates ? g : null;
}
function byType(type) {
  const out = [];
  for (const e of S.entities.values()) if (shortType(e) === type) out.push(e);
  return out;
}

function setSource(id, features) {
  const src = S.map.getSource(id);
  if (src) src.setData({ type: "FeatureCollection", features });
}

// one map source from the located entities that pass `test`, each with `props(e)`
function drawLayer(source, test, props = () => ({})) {
  const feats = [];
  for (const e of S.entities.values()) {
    const g = test(e) && located(e);
    if (g) feats.push(feature(e, g, props(e)));
  }
  setSource(source, feats);
  S.counts[source] = feats.length;
}
const ofType = (type) => (e) => shortType(e) === type;

function drawRoads() {
  drawLayer("roads", ofType("TrafficFlowObserved"),
    (e) => ({ occ: typeof e.occupancy === "number" ? e.occupancy : -1 }));
}

function drawSignals() {
  drawLayer("signals", ofType("TrafficSignal"), (e) => {
    const ov = plain(e.activeOverride);
    return { color: signalColor(e.signalState), override: !!(ov && ov.active) };
  });
}

function alertSources() {
  const out = new Set();
  for (const e of S.entities.values()) if (isOpenAlert(e) && e.alertSource) out.add(plain(e.alertSource));
  return out;
}

function drawSensors() {
  const flagged = alertSources();
  drawLayer("sensors", (e) => SENSOR_TYPES.has(shortType(e)), (e) => ({ alert: flagged.has(e.id) }));
}

function drawCameras() {
  drawLayer("cameras", ofType("Camera"));
}

function centroid(g) {
  if (g.type === "Point") return g.coordinates;
  const pts = g.type === "LineString" ? g.coordinates : g.type === "Polygon" ? g.coordinates[0] : null;
  if (!pts || !pts.length) return null;
  const n = pts.length;
  return [pts.reduce((a, p) => a + p[0], 0) / n, pts.reduce((a, p) => a + p[1], 0) / n];
}

function drawAlerts() {
  const feats = [];
  for (const e of S.entities.values()) {
    if (!isOpenAlert(e)) continue;
    let g = located(e);
    if (!g && e.alertSource) {
      const src = S.entities.get(plain(e.alertSource));
      g = src ? located(src) : null;
    }
    const c = g && centroid(g);
    if (c) feats.push(feature(e, { type: "Point", coordinates: c }, {}));
  }
  setSource("alerts", feats);
  S.counts.alerts = feats.length;
}

function drawEvs() {
  const lanesOfEdge = new Map();
  for (const e of byType("TrafficFlowObserved")) {
    const seg = plain(e.refRoadSegment);
    const g = located(e);
    if (typeof seg !== "string" || !g) continue;
    const edge = seg.split(":").slice(-1)[0];
    if (!lanesOfEdge.has(edge)) lanesOfEdge.set(edge, g);
  }
  const points = [];
  const routes = [];
  for (const e of S.entities.values()) {
    if (!isActiveRun(e)) continue;
    const g = located(e);
    if (g) points.push(feature(e, g, {}));
    for (const edge of arr(e.remainingRoute)) {
      const lane = lanesOfEdge.get(edge);
      if (lane) routes.push(feature(e, lane, {}));
    }
  }
  setSource("evs", points);
  setSource("ev-routes", routes);
  S.counts.evs = points.length;
}

function fitOnce() {
  // the first time the city is known: every located entity in view
  if (S.fitted || !S.entities.size) return;
  let [w, s, e, n] = [180, 90, -180, -90];
  const add = (p) => { w = Math.min(w, p[0]); e = Math.max(e, p[0]); s = Math.min(s, p[1]); n = Math.max(n, p[1]); };
  for (const ent of S.entities.values()) {
    const g = located(ent);
    if (!g) continue;
    if (g.type === "Point") add(g.coordinates);
    else if (g.type === "LineString") g.coordinates.forEach(add);
  }
  if (w > e) return;
  S.fitted = true;
  S.map.fitBounds([[w, s], [e, n]], { padding: 40, duration: 0, maxZoom: 17 });
}

// -- panels ----------------------------------------------------------------------------------------
// one step that fails (an entity of a shape no one foresaw) is logged and the others still run:
// a failure stopped every later step, for every operator who could see that entity
function step(name, fn) {
  try {
    fn();
  } catch (err) {
    console.error(`dashboard: could not draw ${name}:`, err);
  }
}

function render() {
  S.frame = 0;
  const d = S.dirty;
  S.dirty = new Set();
  if (S.map && S.mapReady) {
    if (d.has("roads")) step("roads", drawRoads);
    if (d.has("signals")) step("signals", drawSignals);
    if (d.has("sensors")) step("sensors", drawSensors);
    if (d.has("cameras")) step("cameras", drawCameras);
    if (d.has("alerts") || d.has("sensors") || d.has("roads")) step("alerts", drawAlerts);
    if (d.has("evs") || d.has("roads")) step("emergency runs", drawEvs);
    step("the first view", fitOnce);
  } else if (["roads", "signals", "sensors", "cameras", "alerts", "evs"].some((k) => d.has(k))) {
    for (const k of ["roads", "signals", "sensors", "cameras", "alerts", "evs"]) if (d.has(k)) S.dirty.add(k);
  }
  if (d.has("alertPanel")) step("the alerts", renderAlerts);
  if (d.has("signalTable")) step("the signals", renderSignals);
  if (d.has("kpi")) step("the KPIs", renderKpis);
  if (d.has("entity")) step("the details", renderEntity);
}

function renderKpis() {
  const kpi = byType("KeyPerformanceIndicator")[0];
  const pct = (now, base) => (base > 0 ? ` (${now <= base ? "−" : "+"}${Math.abs(Math.round((now / base - 1) * 100))}%)` : "");
  if (kpi && typeof kpi.averageDelay === "number") {
    $("kpi-delay").textContent = `${kpi.averageDelay.toFixed(1)} s`;
    $("kpi-delay-base").textContent = typeof kpi.baselineAverageDelay === "number"
      ? `fixed-time ${kpi.baselineAverageDelay.toFixed(1)} s${pct(kpi.averageDelay, kpi.baselineAverageDelay)}` : "";
  }
  if (kpi && typeof kpi.co2 === "number") {
    $("kpi-co2").textContent = `${kpi.co2.toFixed(0)} g/s`;
    $("kpi-co2-base").textContent = typeof kpi.baselineCo2 === "number"
      ? `fixed-time ${kpi.baselineCo2.toFixed(0)} g/s${pct(kpi.co2, kpi.baselineCo2)}` : "";
  }
  let open = 0;
  let runs = 0;
  for (const e of S.entities.values()) {
    if (isOpenAlert(e)) open += 1;
    if (isActiveRun(e)) runs += 1;
  }
  $("kpi-alerts").textContent = String(open);
  $("kpi-alerts").classList.toggle("hot", open > 0);
  $("alert-count").textContent = String(open);
  $("kpi-evs").textContent = String(runs);
  if (S.rate !== null) $("kpi-rate").textContent = `${S.rate.toFixed(1)}/s`;
}

const SEVERITY = { critical: 4, high: 3, medium: 2, informational: 1, low: 1 };
// comments being typed, by alert id: the list is rebuilt whenever an alert changes, and an
// operator's half-written comment must not vanish with the old item
const commentDrafts = new Map();
function renderAlerts() {
  const list = $("alerts");
  const alerts = [...S.entities.values()].filter(isOpenAlert).sort((a, b) =>
    (SEVERITY[plain(b.severity)] || 0) - (SEVERITY[plain(a.severity)] || 0)
    || String(plain(b.dateIssued) || "").localeCompare(String(plain(a.dateIssued) || "")));
  const focused = document.activeElement && document.activeElement.closest("#alerts li");
  const focusId = focused ? focused.dataset.id : null;
  const typing = focused && document.activeElement.matches("input");
  list.replaceChildren(...alerts.slice(0, 200).map(alertItem));
  $("no-alerts").hidden = alerts.length > 0;
  if (focusId) {
    const again = list.querySelector(`li[data-id="${CSS.escape(focusId)}"] ${typing ? "input" : "button"}`);
    if (again) again.focus();
  }
}

function alertItem(a) {
  const status = plain(a.alertStatus) || "open";
  const sev = plain(a.severity) || "";
  const canWrite = S.me && S.me.permissions.includes("data:write");
  const source = typeof plain(a.alertSource) === "string" ? plain(a.alertSource) : "";
  const li = el("li", { class: `alert sev-${sev} st-${status}`, "data-id": a.id },
    el("div", { class: "alert-head" },
      el("span", { class: "badge" }, sev || "alert"),
      el("strong", {}, [plain(a.category), plain(a.subCategory)].filter(Boolean).join(" · ") || "alert"),
      el("span", { class: "muted" }, fmtTime(a.dateIssued || a.validFrom))),
    el("p", {}, plain(a.description) || ""),
    source ? el("button", { type: "button", class: "link", onclick: () => select(source) }, source.split(":").slice(-2).join(":")) : null,
    el("span", { class: "status" }, status),
    plain(a.comment) ? el("p", { class: "comment" }, `“${plain(a.comment)}”`) : null);
  if (canWrite) {
    const input = el("input", { type: "text", "aria-label": "Comment", placeholder: "Comment", maxlength: "500" });
    input.value = commentDrafts.get(a.id) || "";
    input.addEventListener("input", () => {
      if (input.value) commentDrafts.set(a.id, input.value);
      else commentDrafts.delete(a.id);
    });
    li.append(el("div", { class: "actions" },
      status === "open" ? el("button", { type: "button", class: "ack", onclick: () => alertAction(a.id, "acknowledge") }, "Acknowledge") : null,
      el("button", { type: "button", class: "close", onclick: () => alertAction(a.id, "close") }, "Close"),
      el("form", { class: "comment-form", onsubmit: (ev) => { ev.preventDefault(); if (input.value.trim()) alertAction(a.id, "comment", input.value.trim()); } },
        input, el("button", { type: "submit" }, "Comment")),
      el("button", { type: "button", onclick: () => select(a.id) }, "Details")));
  }
  return li;
}

async function alertAction(id, action, text) {
  const msg = $("action-msg");
  const now = new Date().toISOString();
  const who = S.me.subject;
  let attrs;
  if (action === "acknowledge") attrs = { alertStatus: "acknowledged", acknowledgedBy: who, acknowledgedAt: now };
  else if (action === "close") attrs = { alertStatus: "closed", closedBy: who };
  else attrs = { comment: text, commentBy: who };
  try {
    await writeAttrs(id, attrs, "POST");
    if (action === "comment") commentDrafts.delete(id);
    if (action === "close") attrs.validTo = now;
    const e = S.entities.get(id);
    if (e) upsert({ ...e, ...attrs });
    msg.textContent = `${action === "comment" ? "Comment saved" : action === "close" ? "Alert closed" : "Alert acknowledged"} (recorded in the audit trail).`;
    msg.className = "msg ok";
  } catch (err) {
    msg.textContent = `Could not ${action} the alert: ${err.message}`;
    msg.className = "msg error";
  }
}

// The signals table changes several times a second. Its rows and controls are made once per
// signal and then updated in place: a row rebuilt between an operator's mouse-down and
// mouse-up would swallow the click, and a rebuilt form would lose what was being chosen.
const signalRows = new Map(); // signal id -> the row and the parts that change

function signalRow(s, canWrite) {
  let r = signalRows.get(s.id);
  if (!r || r.canWrite !== canWrite) {
    const badge = el("span", { class: "badge on", hidden: true });
    const status = el("span", { class: "muted small" });
    const cell = el("td", { class: "ov" }, badge, status);
    r = { canWrite, badge, status, lamps: el("td", {}), phaseText: el("td", {}), phases: null };
    if (canWrite) {
      const phase = el("select", { "aria-label": `Phase for ${title(s)}`, "data-role": "phase" });
      const dur = el("input", { type: "number", min: "5", max: "3600", value: "120", "aria-label": `Override seconds for ${title(s)}`, class: "dur", "data-role": "dur" });
      cell.append(el("form", { class: "override", onsubmit: (ev) => { ev.preventDefault(); override(s.id, { phase: Number(phase.value), durationS: Number(dur.value) }); } },
        phase, dur, el("button", { type: "submit", "data-role": "apply" }, "Override")));
      r.clear = el("button", { type: "button", class: "clear", "data-role": "clear", hidden: true, onclick: () => override(s.id, { clear: true }) }, "Clear");
      cell.append(r.clear);
      r.phase = phase;
    }
    r.tr = el("tr", { "data-id": s.id },
      el("th", { scope: "row" }, el("button", { type: "button", class: "link", "data-role": "open", onclick: () => select(s.id) }, title(s))),
      r.lamps, r.phaseText, cell);
    signalRows.set(s.id, r);
  }
  const ov = plain(s.activeOverride) || {};
  const state = String(plain(s.signalState) || "");
  if (r.lamps.dataset.state !== state) {
    r.lamps.dataset.state = state;
    r.lamps.replaceChildren(el("span", { class: "lamps", "aria-label": `signal state ${state}` },
      ...[...state].map((c) => el("i", { class: `l-${/[gG]/.test(c) ? "g" : /[yY]/.test(c) ? "y" : "r"}` }))));
  }
  r.phaseText.textContent = `${fmt(s.currentPhase)}${s.inTransition ? " →" : ""}`;
  r.badge.hidden = !ov.active;
  r.badge.textContent = ov.phase !== undefined ? `phase ${ov.phase}` : ov.controller || "on";
  r.status.textContent = plain(s.overrideStatus) || "none";
  if (r.clear) r.clear.hidden = !ov.active;
  const greenPhases = arr(s.greenPhases);
  const phases = greenPhases.join(",");
  if (r.phase && phases !== r.phases) {
    // the choice survives a change of the list where it still exists
    const chosen = r.phases === null ? String(greenPhases[0] ?? 0) : r.phase.value;
    r.phase.replaceChildren(...greenPhases.map((p) => el("option", { value: p, selected: String(p) === chosen }, `phase ${p}`)));
    r.phases = phases;
  }
  return r.tr;
}

function renderSignals() {
  const body = $("signals");
  const canWrite = !!(S.me && S.me.permissions.includes("data:write"));
  const sigs = byType("TrafficSignal").sort((a, b) => title(a).localeCompare(title(b), undefined, { numeric: true }));
  const rows = sigs.map((s) => signalRow(s, canWrite));
  const ids = new Set(sigs.map((s) => s.id));
  for (const id of [...signalRows.keys()]) if (!ids.has(id)) signalRows.delete(id);
  // rows move only when the set of signals changes: moving a row would take its focus away
  const current = [...body.children];
  if (current.length !== rows.length || current.some((node, i) => node !== rows[i])) body.replaceChildren(...rows);
}

async function override(id, value) {
  const msg = $("signals-msg");
  try {
    // POST (append): a signal may have no override attribute (one cleared by deleting it, as
    // docs/traffic.md says, or one the feed did not create), which a PATCH does not write
    await writeAttrs(id, { override: value }, "POST");
    msg.textContent = value.clear ? `Override cleared at ${title(S.entities.get(id) || { id })}.`
      : `Override sent: phase ${value.phase} for ${value.durationS} s (the simulation confirms in overrideStatus).`;
    msg.className = "msg ok";
  } catch (err) {
    msg.textContent = `Override refused: ${err.message}`;
    msg.className = "msg error";
  }
}

// -- the entity panel and its chart -----------------------------------------------------------
const SKIP = new Set(["id", "type", "location", "@context"]);
function numericAttrs(e) {
  return Object.keys(e).filter((k) => !SKIP.has(k) && typeof e[k] === "number").slice(0, 6);
}

function select(id) {
  S.selected = id;
  showTab("entity");
  S.dirty.add("entity");
  schedule();
  loadChart(id);
}

function renderEntity() {
  const e = S.selected && S.entities.get(S.selected);
  $("entity-empty").hidden = !!e;
  $("entity").hidden = !e;
  if (!e) return;
  $("entity-title").textContent = `${shortType(e)} ${title(e)}`;
  $("entity-id").textContent = e.id;
  const rows = [];
  for (const [k, v] of Object.entries(e)) {
    if (SKIP.has(k)) continue;
    rows.push(el("dt", {}, k), el("dd", {}, k.startsWith("date") || k.startsWith("valid") ? `${fmt(v)}` : fmt(v)));
  }
  $("entity-attrs").replaceChildren(...rows);
}

async function loadChart(id) {
  const e = S.entities.get(id);
  const msg = $("chart-msg");
  if (S.chart) { S.chart.destroy(); S.chart = null; }
  if (!e) return;
  const attrs = numericAttrs(e);
  S.chartAttrs = attrs;
  if (!attrs.length) { msg.textContent = "No numeric values to chart."; return; }
  msg.textContent = "Loading history…";
  try {
    await loadScript("/ui/chart.js", "Chart");
    const since = new Date(Date.now() - HISTORY_HOURS * 3600e3).toISOString();
    const q = `timerel=after&timeAt=${encodeURIComponent(since)}&options=temporalValues&attrs=${attrs.join(",")}&lastN=720`;
    const hist = (await api(`${NGSI}/temporal/entities/${encodeURIComponent(id)}?${q}`)).data;
    if (S.selected !== id) return;
    const colors = ["#38bdf8", "#f97316", "#a78bfa", "#22c55e", "#f43f5e", "#eab308"];
    const datasets = attrs.map((a, i) => {
      const values = (hist[a] && hist[a].values) || [];
      return {
        label: a, borderColor: colors[i], backgroundColor: colors[i], pointRadius: 0, borderWidth: 2, stepped: true,
        yAxisID: i === 0 ? "y" : "y1", hidden: i > 1,
        data: values.map(([v, t]) => ({ x: Date.parse(t), y: v })).sort((p, q2) => p.x - q2.x),
      };
    });
    const n = datasets.reduce((s, d) => s + d.data.length, 0);
    msg.textContent = n ? `Last ${HISTORY_HOURS} h (${n} readings). Click a legend entry to show or hide it.` : `No history in the last ${HISTORY_HOURS} h yet.`;
    S.chart = new Chart($("entity-chart"), {
      type: "line",
      data: { datasets },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        scales: {
          x: { type: "time", ticks: { color: "#cbd5e1" }, grid: { color: "#1f2a37" } },
          y: { ticks: { color: "#cbd5e1" }, grid: { color: "#1f2a37" } },
          y1: { position: "right", ticks: { color: "#cbd5e1" }, grid: { display: false } },
        },
        plugins: { legend: { labels: { color: "#e5e7eb" } } },
      },
    });
  } catch (err) {
    msg.textContent = err.status === 403 ? "This token may not read the history of this entity." : `History unavailable: ${err.message}`;
  }
}

function appendChart(e) {
  if (!S.chart) return;
  const t = Date.now();
  S.chart.data.datasets.forEach((ds) => {
    if (typeof e[ds.label] === "number") ds.data.push({ x: t, y: e[ds.label] });
  });
  S.chart.update("none");
}

// -- tabs and keyboard ------------------------------------------------------------------------------
const TABS = ["alerts", "signals", "entity"];
function showTab(name) {
  for (const t of TABS) {
    const on = t === name;
    $(`tab-${t}`).setAttribute("aria-selected", String(on));
    $(`tab-${t}`).tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
  }
}

function boot() {
  $("site").textContent = CFG.site && CFG.site !== "cityward" ? `· ${CFG.site}` : "· operations room";
  for (const t of TABS) $(`tab-${t}`).addEventListener("click", () => showTab(t));
  $("side").querySelector("[role=tablist]").addEventListener("keydown", (ev) => {
    const i = TABS.findIndex((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
    let j = -1;
    if (ev.key === "ArrowRight") j = (i + 1) % TABS.length;
    if (ev.key === "ArrowLeft") j = (i + TABS.length - 1) % TABS.length;
    if (j >= 0) { showTab(TABS[j]); $(`tab-${TABS[j]}`).focus(); ev.preventDefault(); }
  });
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("login-error").textContent = "";
    try {
      await login($("token").value.trim());
    } catch (err) {
      $("login-error").textContent = err.message;
    }
  });
  $("logout").addEventListener("click", () => logout(""));
  // a token handed over in the address (cityward demo opens the page so): kept in the tab,
  // removed from the address bar and history at once; a fragment never reaches the server
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    login(saved).catch((err) => logout(err.message));
  } else {
    logout("");
  }
}

document.addEventListener("DOMContentLoaded", boot);
