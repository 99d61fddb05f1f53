// systemd socket activation (sd_listen_fds): listening sockets start at fd 3.
// libnbd's captive form `nbdinfo [ CMD ]` uses it. LISTEN_PID names the
// process the fds are for. A wrapper such as `npx blockmirror` runs us as its
// child and does not pass fd 3 on; then LISTEN_PID is an ancestor, and we
// take duplicates of its fds with pidfd_getfd (same user, Linux 5.6+).
import fs from 'node:fs';
import { pidfdGetfd } from '../blockdev/native.js';

const SD_LISTEN_FDS_START = 3;

export function socketActivationFds(env: NodeJS.ProcessEnv = process.env): number[] {
  const pid = Number(env.LISTEN_PID);
  const n = Number(env.LISTEN_FDS);
  if (!Number.isInteger(pid) || !Number.isInteger(n) || n < 1) return [];
  const relation = pid === process.pid ? 'self' : isAncestor(pid) ? 'ancestor' : null;
  if (!relation) return [];
  // Not for our children.
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  const fds = Array.from({ length: n }, (_, i) => SD_LISTEN_FDS_START + i);
  if (relation === 'self') return fds;
  return fds.map((fd) => {
    const dup = pidfdGetfd(pid, fd);
    if (dup < 0) throw new Error(`socket activation: cannot take fd ${fd} from process ${pid} (LISTEN_PID): errno ${-dup}`);
    return dup;
  });
}

function isAncestor(pid: number): boolean {
  let p = parentOf(process.pid);
  for (let depth = 0; depth < 8 && p > 1; depth++) {
    if (p === pid) return true;
    p = parentOf(p);
  }
  return false;
}

function parentOf(pid: number): number {
  try {
    // /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return 0;
  }
}
