// NOP-In keepalives (RFC 7143 11.18/11.19): the target pings an idle session, an initiator that
// answers keeps it, one that goes silent is dropped and its session forgotten, and the other
// sessions carry on.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { decodeBhs, encodeBhs } from '../src/protocol/iscsi/bhs.js';
import { Op } from '../src/protocol/iscsi/constants.js';
import { LogicalUnit } from '../src/iscsi/scsi/lu.js';
import { IscsiServer } from '../src/iscsi/server.js';
import { RawInitiator } from './helpers/iscsi-raw.js';

const TARGET = 'iqn.2026-12.test:keepalive';

describe('NOP-In keepalives', () => {
  let server: IscsiServer;
  let port: number;

  beforeAll(async () => {
    const device = new MemoryDevice(1 << 20);
    const luns = new Map([[0, new LogicalUnit({ lun: 0, device, serial: 'k', targetName: TARGET, luns: () => [0] })]]);
    server = new IscsiServer({ log: pino({ level: 'silent' }), targets: [{ name: TARGET, luns }], nopIntervalMs: 300, nopTimeoutMs: 2000 });
    port = Number((await server.listen('127.0.0.1', 0)).split(':').pop());
  });
  afterAll(async () => {
    await server?.close();
  });

  it('drops a session whose initiator stops answering NOP-Ins, keeps one that answers, and forgets the dropped one', async () => {
    const [silent, alive] = [await RawInitiator.connect(port), await RawInitiator.connect(port)];
    try {
      await silent.login(TARGET);
      await alive.login(TARGET);
      expect(server.sessions().filter((s) => !s.discovery)).toHaveLength(2);
      // The live initiator answers every NOP-In with the target's TTT until the silent one is gone.
      let answered = 0;
      const pinged = (async () => {
        for (;;) {
          const f = await alive.next();
          if (!f) return;
          const b = decodeBhs(f.bhs) as { opcode: number; ttt: number };
          if (b.opcode !== Op.NOP_IN || b.ttt === 0xffffffff) continue;
          alive.send(encodeBhs({ opcode: Op.NOP_OUT, immediate: true, final: true, itt: 0xffffffff, ttt: b.ttt, cmdSN: alive.cmdSN }));
          answered++;
        }
      })();
      // The silent one reads its NOP-Ins but never answers: the target must close the connection.
      let pingsIgnored = 0;
      for (;;) {
        const f = await silent.next();
        if (!f) break;
        if ((decodeBhs(f.bhs) as { opcode: number }).opcode === Op.NOP_IN) pingsIgnored++;
      }
      expect(pingsIgnored).toBeGreaterThanOrEqual(1);
      expect(silent.closed).toBe(true);
      // The live one answered pings the whole time and is still served.
      expect(answered).toBeGreaterThanOrEqual(1);
      expect(alive.closed).toBe(false);
      const sessions = server.sessions().filter((s) => !s.discovery);
      expect(sessions).toHaveLength(1);
      alive.close();
      await pinged;
    } finally {
      silent.close();
      alive.close();
    }
  });
});
