// The picture `blockmirror xfer ls` prints: the MCB, the devices and their paths, and per
// connection slot its state, its pointer table and the segments in use.
import { AckFlag, Command, Piece, PtrFlag, Status } from './layout.js';
import { slotUsage } from './gc.js';
import type { XferVolume } from './volume.js';

export interface SlotReport {
  slot: number;
  state: 'free' | 'connecting' | 'connected' | 'closing';
  requestor: number;
  requestee: number;
  token: number;
  heartbeats: [number, number];
  segmentsInUse: number;
  pointers: { entry: number; seq: number; length: number; last: boolean; msg: number; part: number; end: boolean; dev: number; offset: number; acked: boolean }[];
}

export interface VolumeReport {
  volume: string;
  segSize: number;
  segmentsPerConnection: number;
  totalSegments: number;
  maxConnections: number;
  devices: { index: number; segments: number; paths: { name: string; live: boolean }[] }[];
  connections: SlotReport[];
}

export async function describe(vol: XferVolume): Promise<VolumeReport> {
  const table = await vol.readPidTable();
  const m = vol.mcb;
  const connections: SlotReport[] = [];
  for (let slot = 0; slot < table.length; slot++) {
    const { req, rsp } = table[slot];
    const { ptr, ack, inUse } = await slotUsage(vol, slot, req.token);
    const reqOn = req.command.code !== Command.NONE;
    const rspOn = rsp.command.code !== Command.NONE;
    const state = !reqOn && !rspOn ? 'free' : reqOn && rspOn && rsp.token === req.token && rsp.command.status === Status.ACCEPTED ? 'connected' : reqOn ? 'connecting' : 'closing';
    const pointers = ptr.token === req.token && req.token !== 0
      ? ptr.entries.slice(0, m.entries).flatMap((e, i) =>
          e.flag === PtrFlag.WRITTEN
            ? [{ entry: i, seq: e.seq, length: e.length, last: (e.last & Piece.LAST) !== 0, msg: e.msg, part: e.part, end: (e.last & Piece.END) !== 0, dev: e.dev, offset: e.offset, acked: ack.token === req.token && ack.entries[i].flag === AckFlag.READ && ack.entries[i].seq === e.seq }]
            : [],
        )
      : [];
    connections.push({
      slot,
      state,
      requestor: req.requestor || rsp.requestor,
      requestee: req.requestee || rsp.requestee,
      token: req.token || rsp.token,
      heartbeats: [req.heartbeat, rsp.heartbeat],
      segmentsInUse: inUse,
      pointers,
    });
  }
  const secs = vol.sdt.devices.slice(0, vol.sdt.count);
  return {
    volume: m.volume.toString('hex'),
    segSize: m.segSize,
    segmentsPerConnection: m.entries,
    totalSegments: m.segments + secs.reduce((n, d) => n + d.segments, 0),
    maxConnections: m.maxConn,
    devices: vol.devices.map((d, index) => ({ index, segments: index === 0 ? m.segments : secs[index - 1].segments, paths: d.paths })),
    connections,
  };
}
