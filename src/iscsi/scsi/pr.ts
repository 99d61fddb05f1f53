// Persistent reservations (SPC-4 5.13, 6.15, 6.16): registrations by I_T nexus, one reservation
// of six types, kept in a JSON file when the LU has one (so they survive a restart, APTPL or not:
// clusters fence with them, and a restarted array must not forget a fence).
//
//   type  name     non-registrant read   non-registrant write   holders
//   1     WE       allowed               conflict               the reserving nexus
//   3     EA       conflict              conflict               the reserving nexus
//   5     WE-RO    allowed               conflict               the reserving nexus (registrants may write)
//   6     EA-RO    conflict              conflict               the reserving nexus (registrants may do all)
//   7     WE-AR    allowed               conflict               every registrant
//   8     EA-AR    conflict              conflict               every registrant
import fs from 'node:fs';
import { Asc, SenseKey, Status } from './constants.js';
import { invalidField, invalidParameter, parameterListLength, SenseError, StatusError } from './sense.js';

const TYPES = new Set([1, 3, 5, 6, 7, 8]);
const ALL_REGISTRANTS = new Set([7, 8]);
const REGISTRANTS_ONLY = new Set([5, 6, 7, 8]);
const EXCLUSIVE_ACCESS = new Set([3, 6, 8]);

interface Reservation {
  holder: string;
  type: number;
}

interface Saved {
  generation: number;
  registrations: Array<[nexus: string, key: string]>;
  reservation?: Reservation;
}

const conflict = (): StatusError => new StatusError(Status.RESERVATION_CONFLICT);

export class PersistentReservations {
  generation = 0;
  /** initiator port -> reservation key */
  readonly registrations = new Map<string, bigint>();
  reservation?: Reservation;

  constructor(private readonly file?: string) {
    if (file && fs.existsSync(file)) {
      const s = JSON.parse(fs.readFileSync(file, 'utf8')) as Saved;
      this.generation = s.generation;
      for (const [n, k] of s.registrations) this.registrations.set(n, BigInt(k));
      this.reservation = s.reservation;
    }
  }

  private save(): void {
    if (!this.file) return;
    const s: Saved = { generation: this.generation, registrations: [...this.registrations].map(([n, k]) => [n, k.toString()]), reservation: this.reservation };
    const tmp = `${this.file}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(s));
    fs.renameSync(tmp, this.file);
  }

  private isHolder(nexus: string): boolean {
    const r = this.reservation;
    if (!r) return false;
    return ALL_REGISTRANTS.has(r.type) ? this.registrations.has(nexus) : r.holder === nexus;
  }

  /** Throws RESERVATION CONFLICT when `nexus` may not run a command of this class now. */
  check(nexus: string, access: 'read' | 'write'): void {
    const r = this.reservation;
    if (!r || this.isHolder(nexus)) return;
    if (REGISTRANTS_ONLY.has(r.type) && this.registrations.has(nexus)) return;
    if (access === 'write' || EXCLUSIVE_ACCESS.has(r.type)) throw conflict();
  }

  in(cdb: Buffer): Buffer {
    const sa = cdb[1]! & 0x1f;
    switch (sa) {
      case 0: {
        const keys = [...this.registrations.values()];
        const b = Buffer.alloc(8 + keys.length * 8);
        b.writeUInt32BE(this.generation, 0);
        b.writeUInt32BE(keys.length * 8, 4);
        keys.forEach((k, i) => b.writeBigUInt64BE(k, 8 + i * 8));
        return b;
      }
      case 1: {
        const r = this.reservation;
        const b = Buffer.alloc(r ? 24 : 8);
        b.writeUInt32BE(this.generation, 0);
        if (r) {
          b.writeUInt32BE(16, 4);
          // For all-registrants types the key is 0 (SPC-4 6.15.3.3).
          b.writeBigUInt64BE(ALL_REGISTRANTS.has(r.type) ? 0n : (this.registrations.get(r.holder) ?? 0n), 8);
          b[21] = r.type; // scope LU (0) << 4 | type
        }
        return b;
      }
      case 2: {
        const b = Buffer.alloc(8);
        b.writeUInt16BE(8, 0);
        b[2] = 0x10; // CRH: RESERVE(6)/RELEASE(6) handled as conflicts by the reservation
        b[3] = 0x80; // TMV: the type mask below is valid
        b[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WE-AR, EA-RO, WE-RO, EA, WE
        b[5] = 0x01; // EA-AR
        return b;
      }
      case 3: {
        const descs: Buffer[] = [];
        for (const [nexus, key] of this.registrations) {
          const tid = transportId(nexus);
          const d = Buffer.alloc(24 + tid.length);
          d.writeBigUInt64BE(key, 0);
          if (this.isHolder(nexus)) {
            d[12] = 0x01;
            d[13] = this.reservation!.type;
          }
          d.writeUInt32BE(tid.length, 20);
          tid.copy(d, 24);
          descs.push(d);
        }
        const body = Buffer.concat(descs);
        const h = Buffer.alloc(8);
        h.writeUInt32BE(this.generation, 0);
        h.writeUInt32BE(body.length, 4);
        return Buffer.concat([h, body]);
      }
      default:
        throw invalidField(1);
    }
  }

  /** PERSISTENT RESERVE OUT; returns the nexuses whose tasks a PREEMPT AND ABORT aborts. */
  out(cdb: Buffer, data: Buffer | undefined, nexus: string): string[] {
    const sa = cdb[1]! & 0x1f;
    const scopeType = cdb[2]!;
    const listLength = cdb.readUInt32BE(5);
    if (sa > 6) throw invalidField(1); // REGISTER AND MOVE and beyond: not supported
    if (listLength !== 24) throw parameterListLength();
    if (!data || data.length < 24) throw parameterListLength();
    const key = data.readBigUInt64BE(0);
    const sark = data.readBigUInt64BE(8);
    const flags = data[20]!;
    if (flags & 0x08) throw invalidParameter(20); // SPEC_I_PT not supported
    if (flags & 0x04) throw invalidParameter(20); // ALL_TG_PT not supported
    const mine = this.registrations.get(nexus);
    const type = scopeType & 0x0f;
    const needsType = sa === 1 || sa === 2 || sa === 4 || sa === 5;
    if (needsType && (scopeType >> 4 !== 0 || !TYPES.has(type))) throw invalidField(2);
    let aborted: string[] = [];
    switch (sa) {
      case 0: // REGISTER
      case 6: {
        // REGISTER AND IGNORE EXISTING KEY
        if (sa === 0 && (mine ?? 0n) !== key) throw conflict();
        if (sark === 0n) {
          if (mine !== undefined) this.unregister(nexus);
        } else this.registrations.set(nexus, sark);
        this.generation++;
        break;
      }
      case 1: {
        // RESERVE
        if (mine === undefined || mine !== key) throw conflict();
        const r = this.reservation;
        if (r) {
          if (!this.isHolder(nexus) || r.type !== type) throw conflict();
          return [];
        }
        this.reservation = { holder: nexus, type };
        break;
      }
      case 2: {
        // RELEASE
        if (mine === undefined || mine !== key) throw conflict();
        const r = this.reservation;
        if (!r || !this.isHolder(nexus)) return [];
        if (r.type !== type) throw new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: 0x2604 });
        this.reservation = undefined;
        break;
      }
      case 3: {
        // CLEAR
        if (mine === undefined || mine !== key) throw conflict();
        this.registrations.clear();
        this.reservation = undefined;
        this.generation++;
        break;
      }
      case 4:
      case 5: {
        // PREEMPT, PREEMPT AND ABORT
        if (mine === undefined || mine !== key) throw conflict();
        const r = this.reservation;
        if (r && ALL_REGISTRANTS.has(r.type) && sark === 0n) {
          aborted = [...this.registrations.keys()].filter((n) => n !== nexus);
          for (const n of aborted) this.registrations.delete(n);
          this.reservation = { holder: nexus, type };
        } else if (r && this.registrations.get(r.holder) === sark) {
          aborted = [...this.registrations].filter(([n, k]) => k === sark && n !== nexus).map(([n]) => n);
          for (const n of aborted) this.registrations.delete(n);
          this.reservation = { holder: nexus, type };
        } else {
          if (sark === 0n) throw invalidParameter(8);
          aborted = [...this.registrations].filter(([, k]) => k === sark).map(([n]) => n);
          if (aborted.length === 0) throw conflict();
          for (const n of aborted) this.registrations.delete(n);
        }
        this.generation++;
        break;
      }
    }
    this.save();
    return sa === 5 ? aborted : [];
  }

  private unregister(nexus: string): void {
    this.registrations.delete(nexus);
    const r = this.reservation;
    if (!r) return;
    if (ALL_REGISTRANTS.has(r.type) ? this.registrations.size === 0 : r.holder === nexus) this.reservation = undefined;
  }
}

/** An iSCSI TransportID (SPC-4 7.6.4.6, format 01b: name,i,0xISID), padded to a multiple of 4. */
function transportId(nexus: string): Buffer {
  const name = Buffer.from(nexus + '\0', 'utf8');
  const len = (name.length + 3) & ~3;
  const b = Buffer.alloc(4 + len);
  b[0] = 0x40 | 0x05;
  b.writeUInt16BE(len, 2);
  name.copy(b, 4);
  return b;
}

export { Asc };
