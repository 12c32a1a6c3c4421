// The web UI: every page reads /api/v1 with the session cookie and follows /api/v1/events.
// Changes (submit, cancel) send the page's CSRF token in X-CSRF-Token.
"use strict";

const CSRF = document.querySelector("meta[name=csrf-token]").content;
const PAGE = document.body.dataset.page;
const SUBJECT = document.body.dataset.subject;
const SCOPE = document.body.dataset.scope;
const CAN_OPERATE = SCOPE === "operate" || SCOPE === "admin";
const TERMINAL = new Set(["SUCCESS", "FAILURE", "CANCELED"]);
const content = document.getElementById("content");

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.message)) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", "X-CSRF-Token": CSRF };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch("/api/v1" + path, {
    credentials: "same-origin",
    ...options,
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (response.status === 401) {
    location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search);
    throw new ApiError(401, null);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// el("td", {class: "x"}, "text", child...): a DOM element; text is never parsed as HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seconds(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function duration(run) {
  if (!run.started_at) return "";
  const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
  return seconds(end - Date.parse(run.started_at));
}

function badge(state) {
  return el("span", { class: "state", "data-state": state }, state);
}

function problem(error) {
  return el("p", { class: "error", role: "alert" }, String(error.message || error));
}

// Run fn at most every `ms`, and once more after the last call.
function throttle(fn, ms) {
  let timer = null;
  let again = false;
  return () => {
    if (timer) {
      again = true;
      return;
    }
    fn();
    timer = setTimeout(() => {
      timer = null;
      if (again) {
        again = false;
        fn();
      }
    }, ms);
  };
}

function follow(query, onEvent) {
  const source = new EventSource("/api/v1/events" + query);
  source.onmessage = onEvent;
  for (const kind of ["SubmitRun", "RunLaunched", "RunStarted", "RunSucceeded", "RunFailed",
    "RunRetrying", "CancelRun", "RunEnded", "Admitted"]) {
    source.addEventListener(kind, onEvent);
  }
  return source;
}

// ----------------------------------------------------------------------------- runs

async function runsPage() {
  const params = new URLSearchParams(location.search);
  const states = ["", "QUEUED", "STARTING", "STARTED", "CANCELING", "SUCCESS", "FAILURE", "CANCELED"];
  const form = el("form", { class: "filters", method: "get", action: "/ui/runs" },
    el("label", {}, "State ", el("select", { name: "state" },
      states.map((s) => el("option", { value: s, selected: params.get("state") === s }, s || "any")))),
    el("label", {}, "Queue ", el("input", { name: "queue", value: params.get("queue") || "" })),
    el("label", {}, "Location ", el("input", { name: "location", value: params.get("location") || "" })),
    el("label", {}, "Tag ", el("input", { name: "tag", placeholder: "KEY=VALUE", value: params.get("tag") || "" })),
    el("button", { type: "submit" }, "Filter"));
  const body = el("tbody");
  const table = el("table", { id: "runs" },
    el("thead", {}, el("tr", {}, ["Run", "State", "Queue", "Agent", "Duration", "Created", "Waiting on"]
      .map((h) => el("th", {}, h)))), body);
  const more = el("p", { class: "more" });
  content.replaceChildren(form, table, more);
  const query = new URLSearchParams();
  for (const key of ["state", "queue", "location", "tag"]) {
    if (params.get(key)) query.set(key, params.get(key));
  }
  query.set("limit", "100");

  async function refresh() {
    try {
      const page = await api("/runs?" + query.toString());
      body.replaceChildren(...page.runs.map((run) => el("tr", { "data-run-id": run.run_id },
        el("td", {}, el("a", { href: "/ui/runs/" + run.run_id }, run.run_id.slice(0, 8))),
        el("td", {}, badge(run.state)),
        el("td", {}, run.queue),
        el("td", {}, run.agent_id || ""),
        el("td", {}, duration(run)),
        el("td", {}, when(run.created_at)),
        el("td", {}, run.waiting_on || ""))));
      more.textContent = page.next_cursor ? "Newest 100 shown; narrow the filters for more." : "";
    } catch (error) {
      more.replaceChildren(problem(error));
    }
  }
  await refresh();
  follow("", throttle(refresh, 300));
  setInterval(refresh, 5000); // durations move on; the events keep the states
}

// ------------------------------------------------------------------------------ a run

function timeline(detail) {
  // One lane per attempt: queued, launching, running (the monitor's decisions and retries
  // marked), and a lane of bars for the run's steps.
  const events = detail.events;
  const created = Date.parse(detail.run.created_at);
  const ended = detail.run.finished_at ? Date.parse(detail.run.finished_at) : Date.now();
  const lastEvent = events.length ? Date.parse(events[events.length - 1].recorded_at) : created;
  const end = Math.max(ended, lastEvent, created + 1000);
  const width = 900;
  const x = (t) => 110 + ((t - created) / (end - created)) * (width - 130);
  const attempts = new Map();
  for (const event of events) {
    const lane = attempts.get(event.attempt) || [];
    lane.push(event);
    attempts.set(event.attempt, lane);
  }
  const steps = detail.progress.filter((p) => p.event === "step_started" || p.event === "step_finished");
  const bars = [];
  const open = new Map();
  for (const item of steps) {
    const key = item.attempt + "/" + item.step;
    if (item.event === "step_started") open.set(key, item);
    else {
      const started = open.get(key);
      const finish = Date.parse(item.recorded_at);
      const start = started ? Date.parse(started.recorded_at)
        : finish - (item.duration_s || 0) * 1000;
      bars.push({ step: item.step, start, finish, status: item.status || "" });
      open.delete(key);
    }
  }
  for (const item of open.values()) {
    bars.push({ step: item.step, start: Date.parse(item.recorded_at), finish: end, status: "running" });
  }
  const lanes = [...attempts.keys()].sort((a, b) => a - b);
  const height = 40 + lanes.length * 34 + (bars.length ? 20 + bars.length * 18 : 0);
  const picture = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "timeline", role: "img",
    "aria-label": "Timeline of the run" });
  picture.append(svg("text", { x: 110, y: 14, class: "axis" }, new Date(created).toLocaleTimeString()));
  picture.append(svg("text", { x: width - 20, y: 14, class: "axis", "text-anchor": "end" },
    new Date(end).toLocaleTimeString()));
  lanes.forEach((attempt, i) => {
    const y = 26 + i * 34;
    picture.append(svg("text", { x: 0, y: y + 16, class: "lane" }, "attempt " + attempt));
    const lane = attempts.get(attempt);
    let state = attempt === 1 ? "QUEUED" : "RETRYING";
    let since = attempt === 1 ? created : Date.parse(lane[0].recorded_at);
    const segment = (from, to, kind) => {
      picture.append(svg("rect", { x: x(from), y, width: Math.max(2, x(to) - x(from)), height: 22,
        class: "seg seg-" + kind.toLowerCase() }, svg("title", {}, kind + " " + seconds(to - from))));
    };
    for (const event of lane) {
      const at = Date.parse(event.recorded_at);
      if (event.to_state && event.to_state !== state) {
        segment(since, at, state);
        state = event.to_state;
        since = at;
      }
      if (event.kind === "RunRetrying" || (event.payload && event.payload.source === "_monitor")
        || event.kind === "CancelRun") {
        picture.append(svg("line", { x1: x(at), x2: x(at), y1: y - 3, y2: y + 25, class: "mark" },
          svg("title", {}, event.kind + (event.payload && event.payload.reason ? ": " + event.payload.reason : ""))));
      }
    }
    if (!TERMINAL.has(state)) segment(since, end, state);
    else picture.append(svg("circle", { cx: x(since), cy: y + 11, r: 6, class: "end end-" + state.toLowerCase() },
      svg("title", {}, state)));
  });
  const top = 40 + lanes.length * 34;
  bars.forEach((bar, i) => {
    const y = top + 10 + i * 18;
    picture.append(svg("text", { x: 0, y: y + 11, class: "lane" }, String(bar.step).slice(0, 14)));
    picture.append(svg("rect", { x: x(bar.start), y, width: Math.max(2, x(bar.finish) - x(bar.start)),
      height: 12, class: "step step-" + bar.status.toLowerCase() },
      svg("title", {}, `${bar.step}: ${bar.status} ${seconds(bar.finish - bar.start)}`)));
  });
  return picture;
}

async function runPage() {
  const runId = SUBJECT;
  const summary = el("dl", { class: "summary" });
  const actions = el("div", { class: "actions" });
  const picture = el("figure", { id: "timeline" });
  const steps = el("table", { id: "steps" });
  const metadata = el("dl", { id: "metadata" });
  const output = el("pre", { id: "output", "aria-live": "polite" });
  const history = el("table", { id: "history" });
  content.replaceChildren(summary, actions, el("h2", {}, "Timeline"), picture,
    el("h2", {}, "Steps"), steps, el("h2", {}, "Metadata"), metadata,
    el("h2", {}, "Output"), output, el("h2", {}, "History"), history);
  let after = null;
  let state = null;
  let lastSeq = 0;

  async function refresh() {
    let detail;
    try {
      detail = await api("/runs/" + runId);
    } catch (error) {
      summary.replaceChildren(problem(error));
      return;
    }
    const run = detail.run;
    state = run.state;
    lastSeq = detail.events.reduce((most, e) => Math.max(most, e.seq), lastSeq);
    const rows = [
      ["State", badge(run.state)], ["Attempt", run.attempt], ["Queue", run.queue],
      ["Image", run.image], ["Command", detail.command.join(" ")],
      ["Location / job", run.location ? run.location + " / " + run.job : ""],
      ["Agent", run.agent_id || ""], ["Submitted by", run.submitted_by || ""],
      ["Created", when(run.created_at)], ["Duration", duration(run)],
      ["Exit code", run.exit_code === null ? "" : run.exit_code],
      ["Failure", run.failure_reason ? run.failure_reason + ": " + (detail.failure_message || "") : ""],
      ["Waiting", detail.waiting || ""],
    ];
    summary.replaceChildren(...rows.filter(([, v]) => v !== "").flatMap(([k, v]) =>
      [el("dt", {}, k), el("dd", { "data-field": k.toLowerCase() }, v)]));
    actions.replaceChildren();
    if (CAN_OPERATE && !TERMINAL.has(run.state) && run.state !== "CANCELING") {
      actions.append(el("button", { id: "cancel", onclick: cancel }, "Cancel run"));
    }
    picture.replaceChildren(timeline(detail));
    const stepItems = detail.progress.filter((p) => p.event === "step_finished" || p.event === "step_started");
    steps.replaceChildren(el("tr", {}, ["Attempt", "Step", "Event", "Status", "Duration"].map((h) => el("th", {}, h))),
      ...stepItems.map((p) => el("tr", {}, el("td", {}, p.attempt), el("td", {}, p.step),
        el("td", {}, p.event), el("td", {}, p.status || ""),
        el("td", {}, p.duration_s === null ? "" : p.duration_s.toFixed(2) + " s"))));
    const meta = detail.progress.filter((p) => p.event === "metadata");
    metadata.replaceChildren(...meta.flatMap((p) => Object.entries(p.details || {}).flatMap(([k, v]) =>
      [el("dt", {}, k), el("dd", {}, typeof v === "string" ? v : JSON.stringify(v))])));
    history.replaceChildren(el("tr", {}, ["When", "Event", "Attempt", "Change"].map((h) => el("th", {}, h))),
      ...detail.events.map((e) => el("tr", {}, el("td", {}, when(e.recorded_at)), el("td", {}, e.kind),
        el("td", {}, e.attempt), el("td", {}, e.to_state ? (e.from_state || "") + " → " + e.to_state : ""))));
    if (!output.textContent && detail.output_tail.length && !after) {
      output.textContent = detail.output_tail.join("\n");
    }
  }

  async function tail() {
    try {
      while (true) {
        const query = new URLSearchParams({ limit: "1000" });
        if (after) query.set("after", after);
        const page = await api(`/runs/${runId}/output?` + query.toString());
        if (page.lines.length) {
          if (!after) output.textContent = "";
          output.textContent += page.lines.map((l) => l.line).join("\n") + "\n";
          const last = page.lines[page.lines.length - 1];
          after = last.attempt + ":" + last.line_no;
          output.scrollTop = output.scrollHeight;
        }
        if (!page.next_after) break;
      }
    } catch (error) {
      // The run's page still shows the rest; the tail comes back on the next beat.
    }
  }

  async function cancel() {
    if (!confirm("Cancel this run?")) return;
    try {
      await api(`/runs/${runId}/cancel`, { method: "POST", body: { grace_s: 10 } });
    } catch (error) {
      actions.replaceChildren(problem(error));
    }
    await refresh();
  }

  await refresh();
  await tail();
  // From the newest event the page shows: what comes after it updates the page.
  follow("?run_id=" + runId + "&last_event_id=" + lastSeq, throttle(refresh, 200));
  const beat = setInterval(async () => {
    await tail();
    if (TERMINAL.has(state)) {
      await refresh();
      await tail();
      clearInterval(beat);
    }
  }, 1000);
}

// ---------------------------------------------------------------------------- agents

async function agentsPage() {
  const body = el("tbody");
  content.replaceChildren(el("table", { id: "agents" }, el("thead", {}, el("tr", {},
    ["Agent", "Status", "Heartbeat", "Queues", "Slots used", "In flight", "Capacity"]
      .map((h) => el("th", {}, h)))), body));
  async function refresh() {
    try {
      const agents = await api("/agents");
      body.replaceChildren(...agents.map((a) => el("tr", { "data-agent-id": a.agent_id },
        el("td", {}, a.agent_id),
        el("td", {}, el("span", { class: "state", "data-state": a.status }, a.status)),
        el("td", {}, Number(a.silent_s).toFixed(1) + " s ago"),
        el("td", {}, (a.queues || []).join(", ")),
        el("td", {}, `${(a.in_flight || []).length} of ${a.max_concurrent}`),
        el("td", {}, (a.in_flight || []).map((f) => el("a", { href: "/ui/runs/" + f.run_id },
          String(f.run_id).slice(0, 8) + " ")).slice(0, 20)),
        el("td", {}, [a.cpus ? a.cpus + " CPUs" : "", a.memory_mb ? a.memory_mb + " MiB" : "",
          a.gpus ? a.gpus + " GPUs" : ""].filter(Boolean).join(", ")))));
    } catch (error) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, problem(error))));
    }
  }
  await refresh();
  setInterval(refresh, 1000);
}

// ------------------------------------------------------------------------- locations

// Inputs from a job's JSON schema: a field per property (string, number, integer, boolean,
// enum); anything else as JSON text.
function configFields(schema) {
  const properties = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  return Object.entries(properties).map(([name, spec]) => {
    const id = "config-" + name;
    let input;
    if (Array.isArray(spec.enum)) {
      input = el("select", { id, name }, spec.enum.map((v) => el("option", { value: JSON.stringify(v) }, String(v))));
    } else if (spec.type === "boolean") {
      input = el("input", { id, name, type: "checkbox", checked: spec.default === true });
    } else if (spec.type === "integer" || spec.type === "number") {
      input = el("input", { id, name, type: "number", step: spec.type === "integer" ? "1" : "any",
        value: spec.default ?? "", required: required.has(name) });
    } else if (spec.type === "string") {
      input = el("input", { id, name, type: "text", value: spec.default ?? "", required: required.has(name) });
    } else {
      input = el("textarea", { id, name, "data-json": "1" }, spec.default === undefined ? "" : JSON.stringify(spec.default));
    }
    input.dataset.kind = spec.type || "json";
    return el("div", { class: "field" }, el("label", { for: id }, name + (required.has(name) ? " *" : "")),
      input, el("span", { class: "field-error", "data-field": name }));
  });
}

function readConfig(form) {
  const config = {};
  for (const input of form.querySelectorAll("[data-kind]")) {
    const kind = input.dataset.kind;
    if (input.tagName === "SELECT") config[input.name] = JSON.parse(input.value);
    else if (kind === "boolean") config[input.name] = input.checked;
    else if (input.value === "") continue;
    else if (kind === "integer") config[input.name] = parseInt(input.value, 10);
    else if (kind === "number") config[input.name] = Number(input.value);
    else if (kind === "string") config[input.name] = input.value;
    else config[input.name] = JSON.parse(input.value);
  }
  return config;
}

function launchForm(location, job) {
  const error = el("p", { class: "error", role: "alert" });
  const form = el("form", { class: "launch", "data-job": job.name },
    el("h3", {}, job.name), job.description ? el("p", {}, job.description) : null,
    configFields(job.config_schema || job.schema || {}), error,
    el("button", { type: "submit" }, "Launch " + job.name));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    for (const span of form.querySelectorAll(".field-error")) span.textContent = "";
    let config;
    try {
      config = readConfig(form);
    } catch (problemText) {
      error.textContent = "A field holds no valid JSON: " + problemText;
      return;
    }
    const runId = crypto.randomUUID();
    try {
      await api("/runs", { method: "POST", body: { run_id: runId, location: location.name, job: job.name, config } });
      window.location.href = "/ui/runs/" + runId;
    } catch (failure) {
      const text = failure.message || String(failure);
      // The control plane's reason names the config's field when it can: show it there.
      let placed = false;
      for (const span of form.querySelectorAll(".field-error")) {
        if (text.includes(`'${span.dataset.field}'`) || text.includes(`$.${span.dataset.field}`)
          || text.includes(`config.${span.dataset.field}`)) {
          span.textContent = text;
          placed = true;
        }
      }
      if (!placed) error.textContent = text;
    }
  });
  return form;
}

async function locationsPage() {
  try {
    const locations = await api("/locations");
    if (!locations.length) {
      content.replaceChildren(el("p", {}, "No code locations (dispatcher locations add)."));
      return;
    }
    content.replaceChildren(...locations.map((location) => el("section", { class: "location", "data-location": location.name },
      el("h2", {}, location.name),
      el("dl", {}, el("dt", {}, "State"), el("dd", {}, badge(location.status)),
        el("dt", {}, "Generation"), el("dd", {}, location.generation),
        el("dt", {}, "Image"), el("dd", {}, location.image),
        el("dt", {}, "Queue"), el("dd", {}, location.queue),
        location.error ? [el("dt", {}, "Error"), el("dd", {}, location.error)] : null),
      CAN_OPERATE ? (location.jobs || []).map((job) => launchForm(location, job))
        : el("p", {}, (location.jobs || []).map((j) => j.name).join(", ")))));
  } catch (error) {
    content.replaceChildren(problem(error));
  }
}

// ---------------------------------------------------------------------------- alerts

async function alertsPage() {
  try {
    const alerts = await api("/alerts?limit=200");
    content.replaceChildren(el("table", { id: "alerts" },
      el("tr", {}, ["When", "Kind", "Message", "Deliveries"].map((h) => el("th", {}, h))),
      ...alerts.map((a) => el("tr", {}, el("td", {}, when(a.created_at)), el("td", {}, a.kind),
        el("td", {}, a.message),
        el("td", {}, (a.deliveries || []).map((d) => (d.delivered_at ? "delivered" : "pending") + " " + d.url).join("; "))))));
  } catch (error) {
    content.replaceChildren(problem(error));
  }
}

// ---------------------------------------------------------------------- dead letters

async function deadLettersPage() {
  try {
    const letters = await api("/dead-letters?limit=200");
    if (!letters.length) {
      content.replaceChildren(el("p", {}, "No dead letters."));
      return;
    }
    content.replaceChildren(el("table", { id: "dead-letters" },
      el("tr", {}, ["From", "Why", "Message id", "Body"].map((h) => el("th", {}, h))),
      ...letters.map((d) => el("tr", {}, el("td", {}, d.source_queue), el("td", {}, d.reason),
        el("td", {}, d.message_id || ""), el("td", {}, el("code", {}, d.body.slice(0, 300)))))));
  } catch (error) {
    content.replaceChildren(problem(error));
  }
}

// -------------------------------------------------------------------------- overview

async function overviewPage() {
  try {
    const data = await api("/overview?hours=6");
    const max = Math.max(1, ...data.buckets.map((b) => Object.values(b.states).reduce((a, n) => a + n, 0)));
    const width = 900;
    const height = 200;
    const step = width / Math.max(1, data.buckets.length);
    const colors = ["SUCCESS", "FAILURE", "CANCELED", "STARTED", "QUEUED"];
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 20}`, class: "chart", role: "img",
      "aria-label": "Runs per state per interval" });
    data.buckets.forEach((bucket, i) => {
      let y = height;
      for (const state of colors) {
        const n = bucket.states[state] || 0;
        if (!n) continue;
        const h = (n / max) * height;
        y -= h;
        chart.append(svg("rect", { x: i * step + 1, y, width: Math.max(1, step - 2), height: h,
          class: "bar bar-" + state.toLowerCase() }, svg("title", {}, `${when(bucket.start)}: ${n} ${state}`)));
      }
    });
    content.replaceChildren(
      el("h2", {}, `Runs created in the last ${data.hours} hours, by state now`), chart,
      el("p", { class: "legend" }, colors.map((c) => el("span", { class: "key bar-" + c.toLowerCase() }, c))),
      el("h2", {}, "Failure reasons"),
      el("table", { id: "reasons" }, ...Object.entries(data.failure_reasons).map(([reason, n]) =>
        el("tr", {}, el("td", {}, reason), el("td", {}, n)))),
      el("h2", {}, "Launch latency (submitted → started)"),
      el("table", { id: "latency" }, ...Object.entries(data.launch_latency_s).map(([p, v]) =>
        el("tr", {}, el("td", {}, p), el("td", {}, v === null ? "" : v.toFixed(3) + " s")))));
  } catch (error) {
    content.replaceChildren(problem(error));
  }
}

const PAGES = {
  runs: runsPage,
  run: runPage,
  agents: agentsPage,
  locations: locationsPage,
  alerts: alertsPage,
  "dead-letters": deadLettersPage,
  overview: overviewPage,
};
(PAGES[PAGE] || runsPage)();
