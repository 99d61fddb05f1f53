// The CFS token (docs/SECURITY.md): read by the server and by every client command, so it lives
// apart from the server, which a client should not load (issue 18: `cfs get` start-up).
import type { Logger } from 'pino';
import { looseWarning, readSecretFile } from '../util/secrets.js';

export const CFS_TOKEN_ENV = 'BLOCKMIRROR_CFS_TOKEN';

/** The CFS token in `file` (a warning when other users can read it). */
export function readCfsToken(file: string, log?: Logger): string {
  const f = readSecretFile(file, 'CFS token file');
  if (f.loose) log?.warn(looseWarning(file, 'CFS token file'));
  const token = f.text.trim();
  if (token.length < 16) throw new Error(`the CFS token in ${file} is shorter than 16 characters: make one with: openssl rand -hex 32 > ${file}`);
  return token;
}
