// Run a command on a pseudo-terminal, as a user at a terminal would: stdout and stderr are the
// terminal (isTTY), 120 columns wide. What the terminal showed comes back as one string, escape
// codes and carriage returns included. python3's pty module does the terminal side.
import { spawn } from 'node:child_process';
import { PYTHON, type CmdResult } from './servers.js';

const PTY_RUNNER = `
import fcntl, os, pty, struct, sys, termios
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))
out = bytearray()
while True:
    try:
        d = os.read(fd, 65536)
    except OSError:
        break
    if not d:
        break
    out += d
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(os.waitstatus_to_exitcode(status))
`;

/** `cmd args` on a terminal; `stdout` is everything the terminal showed (the program's stdout and stderr). */
export function runInPty(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CmdResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(PYTHON, ['-c', PTY_RUNNER, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const t = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
    p.once('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

/** The percentages a cli-progress bar drew, in order ("... [███░░] 42% | ..."). */
export function barPercentages(screen: string, label: string): number[] {
  const re = new RegExp(`${label.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} \\[[^\\]]*\\] (\\d+)%`, 'g');
  return [...screen.matchAll(re)].map((m) => Number(m[1]));
}

/** Any escape or carriage-return byte: what a bar leaves in a pipe. */
export const CONTROL_CHARS = /[\x1b\r]/;
