// Small statistics and number formatting for the report.

export function median(xs) {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

export function min(xs) {
  return Math.min(...xs.filter((x) => Number.isFinite(x)));
}

export function max(xs) {
  return Math.max(...xs.filter((x) => Number.isFinite(x)));
}

/** A throughput in the job's unit: MiB/s with sensible precision, IOPS as a grouped integer. */
export function fmtValue(v, unit) {
  if (!Number.isFinite(v)) return 'n/a';
  if (unit === 'IOPS') return `${Math.round(v).toLocaleString('en-US')} IOPS`;
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} MiB/s`;
}

export function fmtMiB(bytes) {
  return Number.isFinite(bytes) ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : 'n/a';
}

/** Two decimals, or three when two would round a miss up to the goal (0.997 is not 1.00). */
export function fmtRatio(r, goal) {
  if (!Number.isFinite(r)) return 'n/a';
  const two = r.toFixed(2);
  return goal !== undefined && r < goal && Number(two) >= goal ? r.toFixed(3) : two;
}
