// Text and login key=value data (RFC 7143 6.1): "key=value\0" pairs, UTF-8, keys of at most 63
// bytes, values of at most 8192 bytes (the longest binary CHAP values). A whole text exchange
// (with continuations) is capped, so an initiator cannot make us buffer without bound.

export const MAX_KEY_LENGTH = 63;
export const MAX_VALUE_LENGTH = 8192;
/** The most text we collect across Continue PDUs for one exchange. */
export const MAX_TEXT_LENGTH = 65536;

export class TextError extends Error {
  override readonly name = 'TextError';
  constructor(
    readonly code: 'ETOOLONG' | 'ESYNTAX' | 'EDUPLICATE',
    message: string,
  ) {
    super(message);
  }
}

export type TextPairs = Array<[key: string, value: string]>;

/** Parse a complete text segment. Trailing padding zeros are ignored; a repeated key is an error (6.1). */
export function parseText(data: Buffer): TextPairs {
  if (data.length > MAX_TEXT_LENGTH) throw new TextError('ETOOLONG', `text of ${data.length} bytes exceeds ${MAX_TEXT_LENGTH}`);
  const out: TextPairs = [];
  const seen = new Set<string>();
  let pos = 0;
  while (pos < data.length) {
    let end = data.indexOf(0, pos);
    if (end < 0) end = data.length;
    if (end === pos) {
      pos++; // padding or an empty pair
      continue;
    }
    const item = data.toString('utf8', pos, end);
    pos = end + 1;
    const eq = item.indexOf('=');
    if (eq <= 0) throw new TextError('ESYNTAX', `text item "${item.slice(0, 64)}" is not key=value`);
    const key = item.slice(0, eq);
    const value = item.slice(eq + 1);
    if (Buffer.byteLength(key) > MAX_KEY_LENGTH) throw new TextError('ETOOLONG', `key "${key.slice(0, 64)}..." exceeds ${MAX_KEY_LENGTH} bytes`);
    if (!/^[A-Za-z0-9.\-+@_]+$/.test(key)) throw new TextError('ESYNTAX', `key "${key.slice(0, 64)}" has characters outside the RFC 7143 key set`);
    if (Buffer.byteLength(value) > MAX_VALUE_LENGTH) throw new TextError('ETOOLONG', `value of ${key} exceeds ${MAX_VALUE_LENGTH} bytes`);
    if (seen.has(key)) throw new TextError('EDUPLICATE', `key ${key} sent twice`);
    seen.add(key);
    out.push([key, value]);
  }
  return out;
}

export function encodeText(pairs: TextPairs): Buffer {
  return Buffer.from(pairs.map(([k, v]) => `${k}=${v}\0`).join(''), 'utf8');
}

/** Numbers: decimal, or hex 0x..., as 6.1 allows. NaN when it is neither. */
export function parseNumber(value: string): number {
  if (/^0[xX][0-9a-fA-F]{1,12}$/.test(value)) return parseInt(value.slice(2), 16);
  if (/^[0-9]{1,15}$/.test(value)) return Number(value);
  return NaN;
}

/** Binary values (CHAP): 0x hex or 0b base64. */
export function parseBinary(value: string): Buffer | undefined {
  if (/^0[xX]([0-9a-fA-F]{2})+$/.test(value)) return Buffer.from(value.slice(2), 'hex');
  if (/^0[xX][0-9a-fA-F]+$/.test(value)) return Buffer.from('0' + value.slice(2), 'hex');
  if (/^0[bB][A-Za-z0-9+/]+=*$/.test(value)) return Buffer.from(value.slice(2), 'base64');
  return undefined;
}

export function encodeBinary(b: Buffer): string {
  return '0x' + b.toString('hex');
}
