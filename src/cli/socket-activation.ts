// systemd socket activation (sd_listen_fds): listening sockets start at fd 3.
// libnbd's captive form `nbdinfo [ CMD ]` uses it. LISTEN_PID names the
// process the fds are for; we also accept an ancestor's pid, so wrappers such
// as `npx blockmirror` (which exec us from a child) still work.
import fs from 'node:fs';

const SD_LISTEN_FDS_START = 3;

export function socketActivationFds(env: NodeJS.ProcessEnv = process.env): number[] {
  const pid = Number(env.LISTEN_PID);
  const n = Number(env.LISTEN_FDS);
  if (!Number.isInteger(pid) || !Number.isInteger(n) || n < 1) return [];
  if (!isSelfOrAncestor(pid)) return [];
  // Not for our children.
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  return Array.from({ length: n }, (_, i) => SD_LISTEN_FDS_START + i);
}

function isSelfOrAncestor(pid: number): boolean {
  let p = process.pid;
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
