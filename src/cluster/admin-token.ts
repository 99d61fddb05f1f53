// Where each storage system's admin token lives (docs/SECURITY.md). `up` creates it on first
// start; the CLI and the peers' dashboards read it from the same place.
//
//   1. BLOCKMIRROR_ADMIN_TOKEN in the environment
//   2. security.adminTokenFile (one token for the whole cluster, e.g. copied to every host)
//   3. DATADIR/admin.token of the storage system
//   4. $XDG_RUNTIME_DIR (or the temp dir)/blockmirror-UID/ for storage systems in memory, one file
//      per YAML file and storage system
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ensureTokenFile, looseWarning, nodeCrypto, readSecretFile, SecretFileError } from '../util/secrets.js';
import type { ClusterConfig } from './config.js';

export const TOKEN_ENV = 'BLOCKMIRROR_ADMIN_TOKEN';

export class AdminTokenError extends Error {
  override readonly name = 'AdminTokenError';
  readonly code = 'ENOTOKEN';
}

/** The per-user directory of files that live as long as the user's session: $XDG_RUNTIME_DIR (else the temp directory)/blockmirror-UID. */
export function userRuntimeDir(): string {
  const uid = typeof process.getuid === 'function' ? process.getuid() : 0;
  return path.join(process.env.XDG_RUNTIME_DIR || os.tmpdir(), `blockmirror-${uid}`);
}

/** The file that holds storage system `ssId`'s token, or undefined when the environment gives it. */
export function adminTokenFile(config: ClusterConfig, ssId: number): string | undefined {
  if (process.env[TOKEN_ENV]) return undefined;
  if (config.security.adminTokenFile) return config.security.adminTokenFile;
  const ss = config.storageSystems.find((s) => s.id === ssId);
  if (ss?.dataDir) return path.join(ss.dataDir, 'admin.token');
  const source = path.resolve(config.source);
  const tag = nodeCrypto().createHash('sha256').update(source).digest('hex').slice(0, 12);
  return path.join(userRuntimeDir(), `${tag}-ss${ssId}.token`);
}

/** For `up`: the token, made when absent. `note` says where a new one was put, or warns about loose permissions. */
export function serverAdminToken(config: ClusterConfig, ssId: number): { token: string; note?: string } {
  const file = adminTokenFile(config, ssId);
  if (!file) return { token: process.env[TOKEN_ENV]! };
  const { token, created, loose } = ensureTokenFile(file);
  if (created) return { token, note: `storage system ${ssId}: created its admin token in ${file} (mode 0600)` };
  return loose ? { token, note: looseWarning(file, 'admin token file') } : { token };
}

/** For clients (the CLI, a peer's dashboard): the token if it can be found here, else undefined. */
export function clientAdminToken(config: ClusterConfig, ssId: number): string | undefined {
  const env = process.env[TOKEN_ENV];
  if (env) return env;
  const file = adminTokenFile(config, ssId)!;
  if (!fs.existsSync(file)) return undefined;
  try {
    return readSecretFile(file, 'admin token file').text.trim() || undefined;
  } catch (e) {
    if (e instanceof SecretFileError) throw new AdminTokenError(`${e.message} (run as the user that started blockmirror up, or set ${TOKEN_ENV})`, { cause: e });
    throw e;
  }
}
