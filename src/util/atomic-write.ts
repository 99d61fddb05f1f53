// A file replaced whole or not at all: a crash leaves the old text or the new, never half.
// In util/ of its own so that `blockmirror pair` (src/cli/pair-edit.ts) writes the YAML without
// loading the controller's pair files and, through them, the crc32c native addon (issue 18).
import fs from 'node:fs';

export function atomicWrite(file: string, text: string): void {
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, text + '\n');
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}
