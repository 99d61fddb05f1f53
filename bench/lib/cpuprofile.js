// Summarise a V8 .cpuprofile (from `node --cpu-prof`): top functions by self
// time, and by total time. Also a CLI:
//   node bench/lib/cpuprofile.js FILE.cpuprofile [TOP]
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function keyOf(cf) {
  const file = cf.url ? path.basename(cf.url.replace(/^file:\/\//, '')) : '';
  const where = file ? ` ${file}:${cf.lineNumber + 1}` : '';
  return `${cf.functionName || '(anonymous)'}${where}`;
}

/**
 * Per-function self and total milliseconds. A sample's duration is the gap
 * to the next sample (timeDeltas[i + 1]), as DevTools counts it.
 */
/**
 * `window` ({ fromEndMs, toEndMs }) keeps only the samples taken between that long before the
 * profile's end and that long before it: the measured run of a benchmark that profiled its setup too.
 */
export function summarise(profile, window) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const selfUs = new Map();
  const { samples, timeDeltas } = profile;
  let t = profile.startTime;
  const lo = window ? profile.endTime - window.fromEndMs * 1000 : -Infinity;
  const hi = window ? profile.endTime - (window.toEndMs ?? 0) * 1000 : Infinity;
  for (let i = 0; i < samples.length; i++) {
    t += timeDeltas[i];
    if (t < lo || t > hi) continue;
    const dt = i + 1 < timeDeltas.length ? timeDeltas[i + 1] : 0;
    selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + dt);
  }
  const self = new Map();
  const total = new Map();
  let all = 0;
  for (const [id, us] of selfUs) {
    all += us;
    const k = keyOf(byId.get(id).callFrame);
    self.set(k, (self.get(k) ?? 0) + us);
    // Count each function once per stack, however deep it recurses.
    const seen = new Set();
    for (let cur = id; cur !== undefined; cur = parent.get(cur)) {
      const kk = keyOf(byId.get(cur).callFrame);
      if (seen.has(kk)) continue;
      seen.add(kk);
      total.set(kk, (total.get(kk) ?? 0) + us);
    }
  }
  // Percentages are of busy time: (idle) is the event loop waiting, which
  // in a bench run is mostly nbdkit's turn.
  const busy = all - (self.get('(idle)') ?? 0);
  const rows = (m) =>
    [...m.entries()]
      .filter(([fn]) => fn !== '(idle)' && fn !== '(root)')
      .map(([fn, us]) => ({ fn, ms: us / 1000, pct: busy > 0 ? (100 * us) / busy : 0 }))
      .sort((a, b) => b.ms - a.ms);
  return { totalMs: all / 1000, busyMs: busy / 1000, self: rows(self), total: rows(total) };
}

export function formatSummary(sum, top = 25) {
  const line = (r) => `${r.ms.toFixed(0).padStart(8)} ms ${r.pct.toFixed(1).padStart(5)}%  ${r.fn}`;
  return [
    `profile: ${sum.totalMs.toFixed(0)} ms sampled, ${sum.busyMs.toFixed(0)} ms busy (percentages are of busy time)`,
    '',
    `top ${top} by self time:`,
    ...sum.self.slice(0, top).map(line),
    '',
    `top ${top} by total time:`,
    ...sum.total.slice(0, top).map(line),
  ].join('\n');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const [file, top, win] = process.argv.slice(2);
  if (!file) {
    process.stderr.write('usage: node bench/lib/cpuprofile.js FILE.cpuprofile [TOP] [FROM_END_S:TO_END_S]\n');
    process.exit(2);
  }
  const [from, to] = (win ?? '').split(':').map(Number);
  const sum = summarise(JSON.parse(fs.readFileSync(file, 'utf8')), win ? { fromEndMs: from * 1000, toEndMs: (to || 0) * 1000 } : undefined);
  process.stdout.write(formatSummary(sum, Number(top) || 25) + '\n');
}
