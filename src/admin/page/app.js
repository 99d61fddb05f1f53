// The dashboard page: renders each DashboardFrame of /api/events (see
// src/admin/dashboard.ts), and sends pair commands to this storage system's
// admin API. Plain browser JavaScript, no build step.
//
// Tables are redrawn on every frame; pair cards are kept and updated in place,
// so a button is never replaced under the pointer.

const COLS = 64; // heatmap cells per row
const CELL_W = 8;
const CELL_H = 6;
const RATE_WINDOW_MS = 2000; // I/O rates: over the last 2 s

const COLOR = { valid: [46, 160, 67], some: [210, 153, 34], invalid: [248, 81, 73] };

const CONFIRM = {
  split: (p) => `Split ${p}?\n\nThe mirrors stop following the master and keep a point-in-time copy. Writes on either side are tracked for a later resync.`,
  resync: (p) => `Resync ${p}?\n\nClusters changed on either side since the split are copied from the master; changes made on the mirrors are lost.`,
  verify: (p) => `Verify ${p}?\n\nCompares the master with each mirror; this reads the whole volume.`,
};

const $ = (id) => document.getElementById(id);
/** Samples kept per volume, for I/O rates. */
const history = new Map();
const cards = new Map();

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** Keep samples younger than windowMs under key; returns [oldest, newest]. */
function sample(key, time, value, windowMs) {
  const list = history.get(key) ?? [];
  list.push({ time, value });
  while (list.length > 2 && list[1].time <= time - windowMs) list.shift();
  history.set(key, list);
  return [list[0], list[list.length - 1]];
}

function render(frame) {
  $('self').textContent = `· storage system ${frame.self}`;
  $('updated').textContent = `updated ${new Date(frame.time).toLocaleTimeString()}`;
  renderSystems(frame);
  renderFaults(frame);
  renderIscsi(frame);
  renderVolumes(frame);
  renderPairs(frame);
  renderSvol(frame);
  renderEtcd(frame);
}

/** The cluster tables in etcd (docs/cluster.md): leases, logical volumes and their mirrors, failovers. */
function renderEtcd(frame) {
  const t = frame.etcd;
  $('etcd').hidden = !t;
  if (!t) return;
  const ref = (r) => `ss${r.ss}/vol${r.vol}`;
  const cells = (...texts) => texts.map((x) => el('td', {}, x));
  $('etcd-systems').tBodies[0].replaceChildren(
    ...t.storageSystems.map((s) => el('tr', { 'data-ss': s.id, class: s.health === 'up' ? '' : 'down' }, ...cells(`SS ${s.id}`, s.health, s.nbd ?? '', s.startedAt ? new Date(s.startedAt).toLocaleString() : ''))),
  );
  $('etcd-volumes').tBodies[0].replaceChildren(
    ...t.logicalVolumes.map((lv) => {
      const mirrors = t.mirrors.find((m) => m.name === lv.name)?.mirrors ?? [];
      return el('tr', { 'data-lv': lv.name }, ...cells(lv.name, ref(lv.master), String(lv.epoch), lv.mode, lv.state ?? '', mirrors.map((m) => `${ref(m)} ${m.state}`).join(', ')));
    }),
  );
  // Newest first: the last failover is what an operator looks for.
  $('etcd-history').tBodies[0].replaceChildren(
    ...[...t.history].reverse().map((h) => el('tr', { 'data-lv': h.name, 'data-epoch': h.epoch }, ...cells(new Date(h.at).toLocaleString(), h.name, String(h.epoch), ref(h.from), ref(h.to), h.reason))),
  );
}

/** S-VOL groups (docs/svol.md): one row per logical member, the pool, and a restore's progress. */
function renderSvol(frame) {
  const groups = frame.svolGroups ?? [];
  $('svol').hidden = groups.length === 0;
  const rows = [];
  for (const g of groups) {
    const head = `${g.name} (SS ${g.ss}, P-VOL ${g.pvol}): ${g.state}, generation ${g.generation}`;
    const restore = g.restore ? `restoring vol${g.restore.logicalId} onto ${g.restore.target}: ${Math.floor((100 * g.restore.copiedClusters) / Math.max(1, g.restore.totalClusters))} %` : '';
    for (const m of g.members) {
      rows.push(
        el(
          'tr',
          { 'data-group': g.name },
          el('td', {}, head),
          el('td', {}, m.logicalId !== undefined ? `vol${m.logicalId}` : '-'),
          el('td', {}, String(m.vol)),
          el('td', {}, m.attr),
          el('td', {}, m.state),
          el('td', {}, `${m.reads} / ${m.writes}`),
          el('td', {}, m.increments ? `${bytes(m.increments.bytes)} / ${bytes(m.increments.capacity)}` : ''),
          el('td', {}, m.error ?? restore),
        ),
      );
    }
  }
  $('svol-groups').tBodies[0].replaceChildren(...rows);
}

function renderSystems(frame) {
  const rows = frame.storageSystems.map((s) => {
    if (!s.reachable) {
      return el('tr', { class: 'down', 'data-ss': s.id }, el('td', {}, `SS ${s.id}`), el('td', {}, 'unreachable'), el('td', { colspan: 6 }, s.error));
    }
    const c = s.cache;
    const lookups = c ? c.hits + c.misses : 0;
    return el(
      'tr',
      { 'data-ss': s.id },
      el('td', {}, s.id === frame.self ? `SS ${s.id} (this)` : `SS ${s.id}`),
      // Replication links to the storage systems it shares pairs with, when it has any.
      el('td', {}, ['up', ...(s.peers ?? []).map((l) => `link to SS ${l.ss} ${l.connected ? 'up' : 'down'}`)].join('; ')),
      el('td', {}, s.nbd),
      el('td', {}, s.id === frame.self ? s.admin : el('a', { href: `http://${s.admin}/` }, s.admin)),
      el('td', {}, c ? `${bytes(c.usedBytes)} / ${bytes(c.size)}` : 'no cache'),
      el('td', {}, c ? bytes(c.dirtyBytes) : ''),
      el('td', {}, lookups ? `${((100 * c.hits) / lookups).toFixed(1)} %` : ''),
      el('td', { class: 'bypassed' }, c && c.bypass ? bytes(c.bypassedBytes ?? 0) : c ? 'off' : ''),
    );
  });
  $('systems').tBodies[0].replaceChildren(...rows);
}

/** iSCSI sessions of the storage systems that run a target (docs/iscsi.md). */
function renderIscsi(frame) {
  const rows = [];
  let any = false;
  for (const s of frame.storageSystems) {
    if (!s.reachable || !s.iscsi) continue;
    any = true;
    for (const x of s.iscsi.sessions) {
      rows.push(el('tr', {}, el('td', {}, `SS ${s.id}`), el('td', {}, x.initiator), el('td', {}, x.address), el('td', {}, x.target), el('td', {}, x.luns.join(', ')), el('td', {}, String(x.commands)), el('td', {}, bytes(x.readBytes)), el('td', {}, bytes(x.writeBytes))));
    }
  }
  $('iscsi').hidden = !any;
  $('iscsi-sessions').tBodies[0].replaceChildren(...rows);
}

/** Faults injected on purpose (docs/faults.md): shown apart, so nobody takes them for real failures. */
function renderFaults(frame) {
  const seen = new Set();
  const items = [];
  for (const s of frame.storageSystems) {
    if (!s.reachable) continue;
    for (const f of s.faults ?? []) {
      const key = `${f.target} ${f.kind}`;
      if (seen.has(key)) continue;
      seen.add(key);
      items.push(el('li', {}, el('code', {}, f.target), ` ${f.description}`));
    }
  }
  $('faults').hidden = items.length === 0;
  $('fault-list').replaceChildren(...items);
}

function renderVolumes(frame) {
  const rows = [];
  for (const s of frame.storageSystems) {
    if (!s.reachable) continue;
    for (const v of s.volumes) {
      const [a, b] = sample(`vol ${s.id}/${v.id}`, frame.time, v, RATE_WINDOW_MS);
      const dt = (b.time - a.time) / 1000;
      const rate = (f) => (dt > 0 ? (b.value[f] - a.value[f]) / dt : 0);
      rows.push(
        el(
          'tr',
          {},
          el('td', {}, `SS ${s.id}`),
          el('td', {}, v.export),
          el('td', {}, bytes(v.size)),
          el('td', {}, v.role),
          el('td', {}, v.pair ?? ''),
          el('td', {}, `${bytes(rate('readBytes'))}/s`),
          el('td', {}, `${bytes(rate('writeBytes'))}/s`),
          el('td', {}, rate('readOps').toFixed(0)),
          el('td', {}, rate('writeOps').toFixed(0)),
        ),
      );
    }
  }
  $('volumes').tBodies[0].replaceChildren(...rows);
}

function renderPairs(frame) {
  const seen = new Set();
  for (const p of frame.pairs) {
    seen.add(p.name);
    let card = cards.get(p.name);
    if (!card) {
      card = newCard(p.name);
      cards.set(p.name, card);
      $('pairs').append(card.root);
    }
    updateCard(card, p, frame);
  }
  for (const [name, card] of cards) {
    if (!seen.has(name)) {
      card.root.remove();
      cards.delete(name);
    }
  }
}

function newCard(name) {
  const buttons = el('span', { class: 'commands' });
  for (const cmd of ['split', 'resync', 'verify']) {
    buttons.append(el('button', { type: 'button', 'data-command': cmd, onclick: () => command(name, cmd) }, cmd));
  }
  const root = el('article', { class: 'pair', 'data-pair': name });
  const title = el('h3', {}, name, ' ');
  const state = el('span', { class: 'state' });
  title.append(state);
  const facts = el('p', { class: 'facts' });
  const error = el('p', { class: 'error' });
  const elsewhere = el('a', { class: 'elsewhere' });
  const mirrors = el('div', { class: 'mirrors' });
  const spark = newSparkline(name);
  root.append(title, facts, spark.root, buttons, elsewhere, error, mirrors);
  return { root, state, facts, spark, buttons, elsewhere, error, mirrors, mirrorViews: new Map() };
}

function updateCard(card, p, frame) {
  card.state.textContent = p.state;
  card.state.className = `state ${p.state}`;
  // fence, epoch, stale and verify come with pairs that support them; older storage systems leave them out.
  const facts = [
    p.mode,
    `fence ${p.fence ?? '—'}`,
    `master ss${p.master.ss}/vol${p.master.vol}`,
    p.epoch !== undefined ? `epoch ${p.epoch}` : '',
    `${p.clusters} clusters of ${bytes(p.clusterSize)}`,
    p.syncRate ? `sync rate ${bytes(p.syncRate)}/s` : 'sync rate unlimited',
    verifyText(p.verify),
  ];
  card.facts.textContent = facts.filter(Boolean).join(' · ');
  card.error.textContent = [p.stale ? 'stale: this copy cannot hear its master' : '', p.error ?? ''].filter(Boolean).join(' · ');
  updateSparkline(card.spark, p.throughput);
  // Commands go to the storage system that runs the pair; from here, only when that is this one.
  const local = p.ss === frame.self;
  card.buttons.hidden = !local;
  card.elsewhere.hidden = local;
  if (!local) {
    const ss = frame.storageSystems.find((s) => s.id === p.ss);
    card.elsewhere.textContent = `commands: on the dashboard of SS ${p.ss}`;
    if (ss) card.elsewhere.href = `http://${ss.admin}/`;
  }
  const bitmap = frame.bitmaps[p.name];
  const keep = new Set();
  for (const m of p.mirrors) {
    const key = `${m.ss}/${m.vol}`;
    keep.add(key);
    let view = card.mirrorViews.get(key);
    if (!view) {
      view = newMirrorView(p.name, m);
      card.mirrorViews.set(key, view);
      card.mirrors.append(view.root);
    }
    updateMirror(view, p, m, bitmap?.mirrors.find((b) => b.ss === m.ss && b.vol === m.vol), bitmap);
  }
  for (const [key, view] of card.mirrorViews) {
    if (!keep.has(key)) {
      view.root.remove();
      card.mirrorViews.delete(key);
    }
  }
}

// ---- Throughput sparklines: the last minute of each pair, as its master's storage system sampled
// it (pairs[].throughput, src/controller/throughput.ts). One line for host I/O (reads and writes on
// the master), one for what the sync daemon copied to the mirrors, on one scale.
const SPARK_W = 240;
const SPARK_H = 32;
const SPARK_SAMPLES = 60;
const SVG_NS = 'http://www.w3.org/2000/svg';

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function newSparkline(pair) {
  const io = svg('polyline', { class: 'spark-io', points: '' });
  const copy = svg('polyline', { class: 'spark-copy', points: '' });
  const chart = svg('svg', { class: 'sparkline', 'data-pair': pair, width: SPARK_W, height: SPARK_H, viewBox: `0 0 ${SPARK_W} ${SPARK_H}` });
  chart.append(copy, io);
  const label = el('span', { class: 'spark-label' });
  const root = el('div', { class: 'throughput' }, chart, label);
  root.hidden = true;
  return { root, io, copy, label };
}

/** Hidden until the pair's master has sampled it once (and while its storage system does not answer). */
function updateSparkline(spark, t) {
  spark.root.hidden = !t || t.read.length === 0;
  if (spark.root.hidden) return;
  const io = t.read.map((r, i) => r + t.write[i]);
  const peak = Math.max(...io, ...t.copy);
  spark.io.setAttribute('points', sparkPoints(io, Math.max(1, peak)));
  spark.copy.setAttribute('points', sparkPoints(t.copy, Math.max(1, peak)));
  spark.label.textContent = `host I/O ${bytes(io[io.length - 1])}/s · copy ${bytes(t.copy[t.copy.length - 1])}/s · peak ${bytes(peak)}/s in the last ${Math.round((t.intervalMs * io.length) / 1000)} s`;
}

/** Newest sample at the right edge; a series shorter than a minute starts further right. */
function sparkPoints(values, max) {
  const step = SPARK_W / (SPARK_SAMPLES - 1);
  const x0 = SPARK_W - (values.length - 1) * step;
  return values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(SPARK_H - 1 - (v / max) * (SPARK_H - 2)).toFixed(1)}`).join(' ');
}

function verifyText(v) {
  if (!v) return '';
  if (v.error) return `verify failed: ${v.error}`;
  if (v.running) return `verifying: ${v.total ? ((100 * v.checked) / v.total).toFixed(0) : 0} %`;
  return `last verify: ${v.differences} differing clusters`;
}

function newMirrorView(pair, m) {
  const label = el('p', { class: 'mirror-label' });
  const canvas = el('canvas', { class: 'heatmap', 'data-pair': pair, 'data-mirror': `${m.ss}/${m.vol}` });
  const root = el('div', { class: 'mirror' }, label, canvas);
  return { root, label, canvas };
}

/** The ETA the controller computed from the sync daemon's copy rate (src/controller/copy-rate.ts). */
function etaText(p, m) {
  if (m.invalidClusters === 0) return 'in sync';
  if (p.state === 'PSUS' || p.state === 'PSUE') return 'copy waits for a resync';
  if (typeof m.etaSeconds === 'number') return `ETA ${duration(m.etaSeconds)} at ${bytes(m.copyRate ?? 0)}/s`;
  return 'ETA —';
}

function updateMirror(view, p, m, counts, bitmap) {
  const eta = etaText(p, m);
  view.label.textContent =
    `mirror ss${m.ss}/vol${m.vol}${m.connected === false ? ' [not connected]' : ''}: ` +
    `${(100 * m.syncProgress).toFixed(1)} % in sync, ${m.invalidClusters} invalid clusters (${bytes(m.invalidClusters * p.clusterSize)}), ` +
    `${eta}, ${bytes(m.copiedBytes)} copied`;
  if (counts) drawHeatmap(view.canvas, counts.invalid, bitmap.clusters);
}

/** One cell per bucket; a bucket's colour says how much of it is Invalid. */
function drawHeatmap(canvas, invalid, clusters) {
  const n = invalid.length;
  const rows = Math.ceil(n / COLS);
  const width = Math.min(n, COLS) * CELL_W;
  const height = rows * CELL_H;
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext('2d');
  for (let i = 0; i < n; i++) {
    const size = Math.floor(((i + 1) * clusters) / n) - Math.floor((i * clusters) / n);
    const f = size > 0 ? invalid[i] / size : 0;
    ctx.fillStyle = color(f);
    ctx.fillRect((i % COLS) * CELL_W, Math.floor(i / COLS) * CELL_H, CELL_W - 1, CELL_H - 1);
  }
}

/** Green when valid; any Invalid cluster turns a cell amber, shading to red as the whole bucket is Invalid. */
function color(f) {
  if (f === 0) return `rgb(${COLOR.valid})`;
  const mix = COLOR.some.map((s, i) => Math.round(s + (COLOR.invalid[i] - s) * f));
  return `rgb(${mix})`;
}

// The admin token (docs/SECURITY.md): from the address's #token= once (then removed from the
// address bar), else asked for; kept for this tab in sessionStorage, never in a cookie.
const TOKEN_KEY = 'blockmirror-admin-token';
{
  const m = /^#token=([A-Za-z0-9_\-.~]+)$/.exec(window.location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, m[1]);
    window.history.replaceState(null, '', window.location.pathname + window.location.search);
  }
}

function authHeaders() {
  const t = sessionStorage.getItem(TOKEN_KEY);
  return t ? { authorization: `Bearer ${t}` } : {};
}

function askToken() {
  const t = window.prompt('Admin token of this storage system (blockmirror admin token -c FILE prints it):');
  if (t) sessionStorage.setItem(TOKEN_KEY, t.trim());
  return Boolean(t);
}

async function command(pair, cmd) {
  if (!window.confirm(CONFIRM[cmd](pair))) return;
  const message = $('message');
  message.className = '';
  message.textContent = `${cmd} ${pair}…`;
  try {
    const res = await fetch(`/api/pairs/${encodeURIComponent(pair)}/${cmd}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...authHeaders() },
      body: '{}',
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      message.className = 'error';
      message.textContent = `${cmd} ${pair}: ${body.error ?? `HTTP ${res.status}`}`;
    } else {
      message.textContent = `${cmd} ${pair}: ${body.pair?.state ?? JSON.stringify(body).slice(0, 200)}`;
    }
  } catch (e) {
    message.className = 'error';
    message.textContent = `${cmd} ${pair}: ${e.message}`;
  }
}

// The live feed is server-sent events read with fetch, not EventSource: EventSource cannot send
// the Authorization header. Reconnects after a second, as EventSource would.
async function connect() {
  const live = $('live');
  for (;;) {
    try {
      const res = await fetch('/api/events', { headers: authHeaders() });
      if (res.status === 401) {
        live.textContent = 'needs the admin token';
        live.className = 'badge down';
        if (!askToken()) return;
        continue;
      }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      live.textContent = 'live';
      live.className = 'badge live';
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffered = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffered.indexOf('\n\n')) >= 0) {
          const event = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          const data = event
            .split('\n')
            .filter((l) => l.startsWith('data:'))
            .map((l) => l.slice(5).trimStart())
            .join('\n');
          if (data) render(JSON.parse(data));
        }
      }
    } catch {
      // fall through to the retry
    }
    live.textContent = 'disconnected, retrying…';
    live.className = 'badge down';
    await new Promise((r) => setTimeout(r, 1000));
  }
}

void connect();
