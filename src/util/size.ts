// Human sizes: 512, 64KiB, 256MiB, 1GiB (binary units; K/M/G/T and KB/MB/... are read as binary too,
// as storage admins type them). Refuses anything else with a message that says what it expected.

const UNITS: Record<string, number> = {
  '': 1, b: 1,
  k: 2 ** 10, kb: 2 ** 10, kib: 2 ** 10,
  m: 2 ** 20, mb: 2 ** 20, mib: 2 ** 20,
  g: 2 ** 30, gb: 2 ** 30, gib: 2 ** 30,
  t: 2 ** 40, tb: 2 ** 40, tib: 2 ** 40,
  p: 2 ** 50, pb: 2 ** 50, pib: 2 ** 50,
};

export class SizeError extends Error {
  override readonly name = 'SizeError';
}

export function parseSize(text: string | number): number {
  if (typeof text === 'number') {
    if (!Number.isSafeInteger(text) || text < 0) throw new SizeError(`invalid size ${text}`);
    return text;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new SizeError(`invalid size "${text}" (expected e.g. 512, 64KiB, 256MiB, 1GiB)`);
  const value = Number(m[1]) * unit;
  if (!Number.isSafeInteger(value)) throw new SizeError(`invalid size "${text}" (not a whole number of bytes, or too large)`);
  return value;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  return `${v}${units[i]}`;
}
