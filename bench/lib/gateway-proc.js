#!/usr/bin/env node
// A gateway without etcd, for bench/gateway-forward.js: the real NBD server and logical volume
// (src/gateway/logical-volume.ts) in front of one master, whose address is fixed in tables held in
// memory. Measures the forward path alone: no lease, no watch, no mirror.
//
//   node bench/lib/gateway-proc.js LISTEN_PORT MASTER_HOST:PORT EXPORT SIZE
import { EventEmitter } from 'node:events';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const [port, master, exportName, size] = process.argv.slice(2);
const { ConnectionPool, LogicalVolumeDevice } = await import(path.join(ROOT, 'dist/gateway/logical-volume.js'));
const { ExportTable } = await import(path.join(ROOT, 'dist/nbd/exports.js'));
const { NbdServer } = await import(path.join(ROOT, 'dist/nbd/server.js'));
const { pino } = await import('pino');

const vol = Number(/^vol(\d+)$/.exec(exportName)?.[1] ?? 1);
const store = Object.assign(new EventEmitter(), {
  tables: {
    logicalVolumes: new Map([['lv', { name: 'lv', master: { ss: 1, vol } }]]),
    storageSystems: new Map([[1, { nbd: master }]]),
    mirrors: new Map(),
  },
});
const log = pino({ level: 'warn' });
const pool = new ConnectionPool(5000);
const exports = new ExportTable();
const device = new LogicalVolumeDevice('lv', Number(size), store, pool, log, 60_000);
exports.add({ name: 'lv', description: 'bench gateway', device, readOnly: false });
const server = new NbdServer({ exports, log });
await server.listen({ kind: 'tcp', host: '127.0.0.1', port: Number(port) });
process.on('SIGTERM', () => {
  void server.close().then(() => pool.close()).then(() => process.exit(0));
});
