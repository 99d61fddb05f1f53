// `blockmirror serve` once its options are parsed (serve.ts): the device, the NBD server and
// the iSCSI target, until SIGTERM or SIGINT.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { DEFAULT_PORT } from '../protocol/constants.js';
import { MemoryDevice } from '../blockdev/memory.js';
import { openFileDevice } from '../blockdev/file.js';
import type { BlockDevice } from '../blockdev/types.js';
import { AtomicDevice } from '../blockdev/atomic.js';
import { FilterDevice } from '../blockdev/filter.js';
import { DEFAULT_ISCSI_PORT } from '../protocol/iscsi/constants.js';
import { ExportTable } from '../nbd/exports.js';
import { NbdServer, type ListenSpec } from '../nbd/server.js';
import { SizeError, formatSize, parseSize } from '../util/size.js';
import { AllowList } from '../util/allow-list.js';
import { UsageError } from './errors.js';
import { addressInUse, addressInUseError } from './listen-error.js';
import { parseListen, type ServeOptions } from './serve.js';
import { socketActivationFds } from './socket-activation.js';
import { catchStopSignals } from './signals.js';
import { serverTlsOptions } from './tls-options.js';

export async function serve(opts: ServeOptions, log: Logger): Promise<void> {
  let size: number | undefined;
  try {
    if (opts.size !== undefined) size = parseSize(opts.size);
  } catch (e) {
    throw new UsageError(`--size: ${(e as SizeError).message}`);
  }
  if (size === 0) throw new UsageError('--size must be greater than 0');
  if (opts.name.length > 4096) throw new UsageError('--name is longer than 4096 bytes');
  if (opts.file === undefined && size === undefined) throw new UsageError('--size is required (or --file with an existing file)');
  if (opts.file !== undefined && size === undefined && !fs.existsSync(opts.file)) {
    throw new UsageError(`--size is required to create ${opts.file}`);
  }

  const specs: ListenSpec[] = [];
  const activated = socketActivationFds();
  if (activated.length > 0) for (const fd of activated) specs.push({ kind: 'fd', fd });
  else {
    if (opts.socket) specs.push({ kind: 'unix', path: opts.socket });
    if (opts.listen || !opts.socket) specs.push({ kind: 'tcp', ...parseListen(opts.listen ?? `127.0.0.1:${DEFAULT_PORT}`) });
  }

  let device: BlockDevice;
  if (opts.file !== undefined) {
    try {
      device = await openFileDevice(opts.file, { size, readOnly: opts.readOnly === true });
    } catch (e) {
      throw new UsageError(`--file ${opts.file}: ${(e as Error).message}`);
    }
  } else device = new MemoryDevice(size!, false);

  const tls = serverTlsOptions(opts, specs.flatMap((x) => (x.kind === 'tcp' ? [{ host: x.host, port: x.port }] : [])));
  const exports = new ExportTable();
  const host = new AtomicDevice(device);
  exports.add({ name: opts.name, description: opts.description ?? '', device: host, readOnly: opts.readOnly === true, ...(opts.allow?.length ? { allow: new AllowList(opts.allow) } : {}) });
  exports.defaultName = opts.name;
  const server = new NbdServer({ exports, log, ...(tls ? { tls } : {}) });

  const stop = catchStopSignals(log);
  for (const spec of specs) {
    let addr: string;
    try {
      addr = await server.listen(spec);
    } catch (e) {
      await device.close();
      const inUse = addressInUse(e);
      if (inUse && spec.kind === 'tcp') throw addressInUseError('--listen', inUse, 'choose another --listen', e);
      const what = spec.kind === 'tcp' ? `${spec.host}:${spec.port}` : spec.kind === 'unix' ? spec.path : `fd ${spec.fd}`;
      throw new Error(`cannot listen on ${what}: ${(e as Error).message}`);
    }
    const uri =
      spec.kind === 'unix' ? `nbd+unix:///${opts.name}?socket=${spec.path}` : spec.kind === 'tcp' ? `nbd://${addr}/${opts.name}` : `fd ${spec.fd}`;
    log.info({ uri, size: device.size, backend: opts.file ? 'file' : 'memory', readOnly: opts.readOnly === true }, `listening: ${uri} (${formatSize(device.size)})`);
  }

  // iSCSI only when asked for: its target, SCSI layer and digests are most of what serve loads.
  const iscsiWiring = opts.iscsi ? await import('../iscsi/wiring.js') : undefined;
  const readChapFile = opts.iscsiChapFile !== undefined ? (await import('../iscsi/chap-file.js')).readChapFile : undefined;
  const iscsi = opts.iscsi
    ? await iscsiWiring!.startIscsi({
        listen: parseListen(opts.iscsi.includes(':') ? opts.iscsi : `${opts.iscsi}:${DEFAULT_ISCSI_PORT}`),
        target: opts.iscsiTarget,
        chap: opts.iscsiChapFile !== undefined ? readChapFile!(opts.iscsiChapFile) : undefined,
        allow: opts.iscsiAllow,
        volumes: [{ lun: 0, serial: opts.name, device: opts.readOnly ? new ReadOnlyView(host) : host, atomic: opts.readOnly ? undefined : host }],
        log,
      }).catch(async (e: Error) => {
        await device.close();
        const inUse = addressInUse(e);
        if (inUse) throw addressInUseError('--iscsi', inUse, 'choose another --iscsi address', e);
        throw new Error(`cannot serve iSCSI on ${opts.iscsi}: ${e.message}`);
      })
    : undefined;
  for (const p of opts.iscsiPortal ?? []) {
    const { host: h, port } = parseListen(p);
    await iscsi?.server.listen(h, port);
  }
  if (iscsi) log.info({ uri: `iscsi://${iscsi.address}/${opts.iscsiTarget}/0` }, `listening: iscsi://${iscsi.address}/${opts.iscsiTarget}/0`);

  await stop.until(async () => {
    await iscsi?.server.close();
    await server.close();
    await device.close();
  });
}

/** --read-only for iSCSI: the LU reports write protection from the device it is given. */
class ReadOnlyView extends FilterDevice {
  override get readOnly(): boolean {
    return true;
  }
}
