// CHAP secrets from a file, so they stay out of the command line, the YAML and the logs:
//   line 1  USER:SECRET            what initiators must prove
//   line 2  USER:SECRET (optional) what the target proves back (mutual CHAP)
import fs from 'node:fs';
import type { ChapSecrets } from './chap.js';

export class ChapFileError extends Error {
  override readonly name = 'ChapFileError';
  readonly code = 'ECHAPFILE';
}

export function parseChapSecrets(text: string, where: string): ChapSecrets {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  const pair = (l: string | undefined, n: number): [string, string] => {
    const i = l?.indexOf(':') ?? -1;
    if (!l || i <= 0 || i === l.length - 1) throw new ChapFileError(`${where}: line ${n} must be USER:SECRET`);
    const secret = l.slice(i + 1);
    // RFC 7143 12.1.3: secrets of at least 12 bytes (16 recommended) resist offline guessing.
    if (secret.length < 12) throw new ChapFileError(`${where}: the CHAP secret on line ${n} is shorter than 12 characters`);
    return [l.slice(0, i), secret];
  };
  if (lines.length === 0 || lines.length > 2) throw new ChapFileError(`${where}: expected one or two lines USER:SECRET`);
  const [user, secret] = pair(lines[0], 1);
  if (lines.length === 1) return { user, secret };
  const [mutualUser, mutualSecret] = pair(lines[1], 2);
  if (mutualSecret === secret) throw new ChapFileError(`${where}: the mutual CHAP secret must differ from the initiator's (RFC 7143 12.1.3)`);
  return { user, secret, mutualUser, mutualSecret };
}

export function readChapFile(file: string): ChapSecrets {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ChapFileError(`cannot read CHAP file ${file}: ${(e as Error).message}`);
  }
  return parseChapSecrets(text, file);
}
