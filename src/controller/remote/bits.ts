// Bitsets on the control channel: base64 on the wire, lists of set clusters in the pair code.
export const b64 = (bits: Uint8Array): string => Buffer.from(bits.buffer, bits.byteOffset, bits.byteLength).toString('base64');

export function fromB64(s: string, clusters: number): Uint8Array {
  const bytes = Buffer.from(s, 'base64');
  const out = new Uint8Array(Math.ceil(clusters / 8));
  out.set(bytes.subarray(0, out.length));
  return out;
}

/** The set clusters of a bitset, ascending, below `clusters`. */
export function setBits(bits: Uint8Array, clusters: number): number[] {
  const out: number[] = [];
  for (let byte = 0; byte < bits.length; byte++) {
    if (bits[byte] === 0) continue;
    for (let bit = 0; bit < 8; bit++) {
      const c = byte * 8 + bit;
      if (c < clusters && bits[byte]! & (1 << bit)) out.push(c);
    }
  }
  return out;
}
