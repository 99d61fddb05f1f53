// Reading what test/vm/nbd-client-vm.sh reports, and checking on the host the ext4 image it left.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { runOk } from './clients.js';
import { run, type CmdResult } from './servers.js';

/** The guest's "VMTEST: LABEL: ..." lines for one target, without the prefix. */
export function vmLines(stdout: string, label: string): string[] {
  const prefix = `VMTEST: ${label}: `;
  return stdout
    .split('\n')
    .filter((l) => l.startsWith(prefix))
    .map((l) => l.slice(prefix.length));
}

/** The sha256 of /f the guest computed for one target. */
export function guestSha256(stdout: string, label: string): string {
  const line = vmLines(stdout, label).find((l) => l.startsWith('sha256 '));
  if (!line) throw new Error(`the guest printed no sha256 for ${label}:\n${stdout}`);
  return line.slice('sha256 '.length).trim();
}

/** e2fsck and the sha256 of /f, read on the host from a raw ext4 image. */
export async function hostCheck(image: string, dir: string): Promise<{ fsck: CmdResult; sha256: string }> {
  const fsck = await run('e2fsck', ['-fn', image]);
  const dumped = path.join(dir, `f-${path.basename(image)}`);
  await runOk('debugfs', ['-R', `dump /f ${dumped}`, image]);
  if (!fs.existsSync(dumped)) throw new Error(`debugfs could not dump /f from ${image}`);
  const sha256 = createHash('sha256').update(fs.readFileSync(dumped)).digest('hex');
  return { fsck, sha256 };
}
