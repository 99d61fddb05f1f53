// CRC32C header and data digests (RFC 7143 13.1). The digest of a data segment covers its padding.
import { crc32c } from '../../util/crc32c.js';

export function digest(parts: Buffer | readonly Buffer[]): number {
  if (Buffer.isBuffer(parts)) return crc32c(parts) >>> 0;
  let c = 0;
  for (const p of parts) c = crc32c(p, c);
  return c >>> 0;
}

export function digestBuffer(parts: Buffer | readonly Buffer[]): Buffer {
  const b = Buffer.allocUnsafe(4);
  // The digest travels little-endian: it is the CRC register as bytes (RFC 3385, as libiscsi and Linux send it).
  b.writeUInt32LE(digest(parts), 0);
  return b;
}

export function pad4(n: number): number {
  return (4 - (n & 3)) & 3;
}
