// The read worker of datapath.ts: NBD reads straight into the main thread's shared chunk buffers,
// over this thread's own connections (one per export), so the main thread's event loop stays free
// for FUSE requests.
import { parentPort, workerData } from 'node:worker_threads';
import { DataPath, isCopyFailure, type DataPathOptions, type NbdAddress, type WorkerReply, type WorkerRequest } from './datapath.js';
import type { ClientTls } from '../nbd/tls.js';

/** Buffers arrive from the main thread as plain Uint8Arrays: make them Buffers again for node:tls. */
function revive(t: ClientTls | undefined): ClientTls | undefined {
  if (!t) return undefined;
  const b = (u: Uint8Array | undefined) => (u ? Buffer.from(u.buffer, u.byteOffset, u.byteLength) : undefined);
  return { ...(t.ca ? { ca: b(t.ca)! } : {}), ...(t.cert ? { cert: b(t.cert)!, key: b(t.key)! } : {}), ...(t.psk ? { psk: { identity: t.psk.identity, key: b(t.psk.key)! } } : {}) };
}

const port = parentPort!;
const addresses = new Map<number, NbdAddress>();
const data = new DataPath((ss) => addresses.get(ss)!, { ...(workerData as DataPathOptions), connections: 1 });

port.on('message', (r: WorkerRequest) => {
  if (r.op === 'drop') return data.drop({ ss: r.ss, vol: r.vol });
  const tls = revive(r.tls);
  addresses.set(r.ss, { host: r.host!, port: r.port!, ...(tls ? { tls } : {}) });
  const dest = Buffer.from(r.sab!, r.byteOffset!, r.length!);
  data.pread({ ss: r.ss, vol: r.vol }, dest, r.offset!).then(
    () => port.postMessage({ id: r.id } satisfies WorkerReply),
    (e: Error) =>
      port.postMessage({
        id: r.id,
        error: { message: e.message, copyFailure: isCopyFailure(e), code: (e as { code?: string }).code ?? 'EIO' },
      } satisfies WorkerReply),
  );
});
