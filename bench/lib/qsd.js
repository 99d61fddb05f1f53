// qemu-storage-daemon as the peer for a synchronous mirror across processes: one daemon exports
// a mirror target over NBD, a second exports the source to the host and mirrors it to the first
// with `blockdev-mirror copy-mode=write-blocking` (a host write completes once both copies hold
// it, as in our sync pairs). Both images are files in /dev/shm, so neither side touches a disk,
// like our memory volumes.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { freePort, onExit, startServer } from './proc.js';

/** Talk QMP on a unix socket: one JSON object per line; events may come between replies. */
async function qmp(socketPath) {
  const sock = net.connect(socketPath);
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  let buf = '';
  const waiting = [];
  const events = [];
  sock.setEncoding('utf8');
  sock.on('data', (d) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const msg = JSON.parse(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
      events.push(msg);
      for (const w of waiting.splice(0)) w();
    }
  });
  /** Resolve with the first message (already received or to come) that `match` accepts, removing it. */
  async function next(match) {
    for (;;) {
      const i = events.findIndex(match);
      if (i >= 0) return events.splice(i, 1)[0];
      await new Promise((r) => waiting.push(r));
    }
  }
  await next((m) => m.QMP);
  async function execute(command, args) {
    sock.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) })}\n`);
    const reply = await next((m) => 'return' in m || 'error' in m);
    if (reply.error) throw new Error(`qemu-storage-daemon: ${command}: ${reply.error.desc}`);
    return reply.return;
  }
  await execute('qmp_capabilities');
  return { execute, next, close: () => sock.destroy() };
}

/**
 * Start the two daemons and the mirror job; resolves once the job is READY (the target is a
 * full copy and every new write is mirrored before it completes).
 */
export async function startQsdMirror(dir, bytes) {
  const shm = fs.mkdtempSync('/dev/shm/bm-bench-qsd-');
  const dropImages = () => fs.rmSync(shm, { recursive: true, force: true });
  onExit(dropImages);
  const images = ['source.img', 'target.img'].map((f) => path.join(shm, f));
  for (const img of images) {
    fs.writeFileSync(img, '');
    fs.truncateSync(img, bytes);
  }
  const [srcPort, tgtPort] = [await freePort(), await freePort()];
  const target = await startServer('qsd target', 'qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=img,filename=${images[1]}`,
    '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${tgtPort}`,
    '--export', 'type=nbd,id=exp,node-name=img,name=target,writable=on',
  ], { kind: 'tcp', host: '127.0.0.1', port: tgtPort });
  const qmpPath = path.join(dir, 'qsd-source.qmp');
  const source = await startServer('qsd source', 'qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=src,filename=${images[0]}`,
    '--blockdev', `driver=nbd,node-name=tgt,server.type=inet,server.host=127.0.0.1,server.port=${tgtPort},export=target`,
    '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${srcPort}`,
    '--export', 'type=nbd,id=exp,node-name=src,name=source,writable=on',
    '--chardev', `socket,id=qmp,path=${qmpPath},server=on,wait=off`,
    '--monitor', 'chardev=qmp',
  ], { kind: 'tcp', host: '127.0.0.1', port: srcPort });
  const mon = await qmp(qmpPath);
  await mon.execute('blockdev-mirror', { 'job-id': 'mirror', device: 'src', target: 'tgt', sync: 'full', 'copy-mode': 'write-blocking' });
  await mon.next((m) => m.event === 'BLOCK_JOB_READY');
  return {
    uri: `nbd://127.0.0.1:${srcPort}/source`,
    pids: [source.pid, target.pid],
    /** Are both images equal over their first `bytes`? (The mirror's own proof that it mirrored.) */
    same(bytes) {
      const [a, b] = images.map((img) => fs.openSync(img, 'r'));
      try {
        const x = Buffer.alloc(1 << 20);
        const y = Buffer.alloc(1 << 20);
        for (let off = 0; off < bytes; off += x.length) {
          fs.readSync(a, x, 0, x.length, off);
          fs.readSync(b, y, 0, y.length, off);
          if (!x.equals(y)) return false;
        }
        return true;
      } finally {
        fs.closeSync(a);
        fs.closeSync(b);
      }
    },
    /** Stop both daemons (again is fine); the images stay for `same` until `drop`. */
    async stop() {
      mon.close();
      await source.stop();
      await target.stop();
    },
    drop: dropImages,
  };
}
