// Secrets on disk: PSK files, tokens and private keys. They are read here and nowhere else, and
// never logged: messages name the file, never its contents.
import fs from 'node:fs';
import { createRequire } from 'node:module';

/**
 * node:crypto, loaded at the first call: only servers make or compare tokens, and a client
 * command that only reads one would otherwise load crypto's ~15 internal modules at start
 * (issue 18). sameSecret runs per admin request, so the module is kept.
 */
export function nodeCrypto(): typeof import('node:crypto') {
  return (crypto ??= createRequire(import.meta.url)('node:crypto') as typeof import('node:crypto'));
}
let crypto: typeof import('node:crypto') | undefined;

export class SecretFileError extends Error {
  override readonly name = 'SecretFileError';
  readonly code = 'ESECRET';
}

export interface SecretFile {
  text: string;
  /** Readable or writable by group or others: the caller warns once (a secret should be mode 0600). */
  loose: boolean;
}

export function readSecretFile(file: string, what: string): SecretFile {
  let st: fs.Stats;
  let text: string;
  try {
    st = fs.statSync(file);
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new SecretFileError(`cannot read the ${what} ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  return { text, loose: (st.mode & 0o077) !== 0 };
}

export function looseWarning(file: string, what: string): string {
  return `the ${what} ${file} is readable by other users; chmod 600 ${file}`;
}

/**
 * A psk file as nbdkit, qemu and GnuTLS's psktool write it: one `identity:hexkey` per line.
 *
 *   alice:3b6e0f...   (the key in hex, at least 16 bytes)
 */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const m = /^([^:\s]{1,128}):([0-9a-fA-F]+)$/.exec(line);
    const where = `${file}:${i + 1}`;
    if (!m) throw new SecretFileError(`${where}: expected IDENTITY:HEXKEY (make one with: psktool -u IDENTITY -p ${file})`);
    if (m[2]!.length % 2 !== 0 || m[2]!.length < 32) throw new SecretFileError(`${where}: the key of ${m[1]} must be at least 16 bytes of hex`);
    if (keys.has(m[1]!)) throw new SecretFileError(`${where}: identity ${m[1]} appears twice`);
    keys.set(m[1]!, Buffer.from(m[2]!, 'hex'));
  });
  if (keys.size === 0) throw new SecretFileError(`${file} holds no IDENTITY:HEXKEY line (make one with: psktool -u IDENTITY -p ${file})`);
  return keys;
}

/** A new random bearer token: 256 bits, URL-safe. */
export function newToken(): string {
  return nodeCrypto().randomBytes(32).toString('base64url');
}

/** Compares in time independent of where the strings differ. */
export function sameSecret(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && nodeCrypto().timingSafeEqual(x, y);
}

/**
 * The token in `file`, created (mode 0600, in a directory only we can enter when we make it)
 * when absent. Returns whether it was created, so the caller can say where to find it.
 */
export function ensureTokenFile(file: string): { token: string; created: boolean; loose: boolean } {
  try {
    const { text, loose } = readSecretFile(file, 'admin token file');
    const token = text.trim();
    if (token.length < 16) throw new SecretFileError(`the admin token in ${file} is shorter than 16 characters; delete the file to have a new one made`);
    return { token, created: false, loose };
  } catch (e) {
    if (!(e instanceof SecretFileError) || !/ENOENT/.test(e.message)) throw e;
  }
  const dir = file.slice(0, file.lastIndexOf('/')) || '/';
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const token = newToken();
  try {
    fs.writeFileSync(file, `${token}\n`, { mode: 0o600, flag: 'wx' });
  } catch (e) {
    // Another process made it first: use theirs.
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return ensureTokenFile(file);
    throw new SecretFileError(`cannot create the admin token file ${file}: ${(e as Error).message}`, { cause: e });
  }
  return { token, created: true, loose: false };
}
