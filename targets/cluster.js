// What the scripts in targets/ share: their failure type (a message and an exit status) and the
// cluster YAML, read with the project's own loader (dist/cluster/config.js) so a file is checked
// exactly as `blockmirror up` checks it. Plain JavaScript: it runs from a checkout after npm install.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** A failure the script reports in one line; `code` is its exit status (1 failed, 2 usage error). */
export class Failure extends Error {
  constructor(message, code = 1) {
    super(message);
    this.code = code;
  }
}

export const usageError = (message) => new Failure(`${message} (see --help)`, 2);

export async function loadCluster(file) {
  const loader = path.join(ROOT, 'dist/cluster/config.js');
  if (!fs.existsSync(loader)) throw new Failure(`${path.relative(process.cwd(), loader) || loader} is missing: run npm install (or npm run build) in ${ROOT}`);
  const { loadConfig } = await import(pathToFileURL(loader).href);
  try {
    return loadConfig(file);
  } catch (e) {
    if (e && e.code === 'ECONFIG') throw new Failure(e.message);
    throw e;
  }
}
