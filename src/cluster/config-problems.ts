// How configuration problems are shown: key paths, line:col, "did you mean".
import { LineCounter, isMap, isPair, isScalar, isSeq, type Node } from 'yaml';
import { ConfigProblem, HostPort, MAX_REPORTED, RawProblem, Segment } from './config.js';
// ---------------------------------------------------------------------------------------------
// Messages.

export function formatProblems(source: string, problems: ConfigProblem[]): string {
  const shown = problems.slice(0, MAX_REPORTED).map((p) => (p.path === '' ? p.message : `${p.path}: ${p.message}`));
  if (problems.length > MAX_REPORTED) shown.push(`and ${problems.length - MAX_REPORTED} more problems`);
  // Only a problem without a key path (a syntax error) gets line:col in the text: a key path already
  // says where, and stays true when lines move. The file:line:col: form is what editors make clickable.
  const first = problems[0];
  const where = first?.path === '' && first.line !== undefined ? `${source}:${first.line}:${first.col}` : source;
  return `${where}: ${shown.join('; ')}`;
}

export function formatHostPort(hp: HostPort): string {
  return hp.host.includes(':') ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}

export function formatPath(at: Segment[]): string {
  let out = '';
  for (const s of at) {
    if (typeof s === 'number') out += `[${s}]`;
    else if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(s)) out += out === '' ? s : `.${s}`;
    else out += `[${JSON.stringify(s)}]`;
  }
  return out;
}

/** Attaches line:col and sorts into file order, so the first problem is the first one a reader meets. */
export function locate(raw: RawProblem[], root: Node | null, lc: LineCounter): ConfigProblem[] {
  const located = raw.map((p, order) => {
    const offset = offsetOf(root, p.path);
    const pos = offset === undefined ? undefined : lc.linePos(offset);
    return { problem: { path: formatPath(p.path), message: p.message, ...(pos ? { line: pos.line, col: pos.col } : {}) }, offset: offset ?? Infinity, order };
  });
  located.sort((a, b) => a.offset - b.offset || a.order - b.order);
  return located.map((l) => l.problem);
}

/** The offset of the key (for a mapping entry) or item at `at`, or of its nearest existing parent. */
export function offsetOf(root: Node | null, at: Segment[]): number | undefined {
  let node: unknown = root;
  let offset = (root as Node | null)?.range?.[0];
  for (const s of at) {
    if (isMap(node)) {
      const pair = node.items.find((it) => isPair(it) && isScalar(it.key) && String(it.key.value) === String(s));
      if (!pair) break;
      offset = (pair.key as Node).range?.[0] ?? offset;
      node = pair.value;
    } else if (isSeq(node) && typeof s === 'number') {
      const item = node.items[s];
      if (!item) break;
      offset = (item as Node).range?.[0] ?? offset;
      node = item;
    } else break;
  }
  return offset;
}

export function valueAt(data: unknown, at: Segment[]): unknown {
  let v = data;
  for (const s of at) v = v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[s] : undefined;
  return v;
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !ArrayBuffer.isView(v);
}

export function show(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'an empty value';
  if (Array.isArray(v)) return 'a list';
  if (isPlainObject(v)) return 'a mapping';
  if (typeof v === 'string') return JSON.stringify(v);
  return String(v);
}

/** The known key within edit distance 2 of a mistyped one, for "did you mean". */
export function closest(key: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = 3;
  for (const k of known) {
    const d = editDistance(key.toLowerCase(), k.toLowerCase());
    if (d < bestDistance) [best, bestDistance] = [k, d];
  }
  return best;
}

export function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = row;
  }
  return prev[b.length]!;
}

