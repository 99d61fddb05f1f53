// CHAP for iSCSI (RFC 7143 12.1.3, RFC 1994): MD5 over identifier, secret and challenge.
// Secrets are held here and compared here; nothing in this module logs them.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { encodeBinary, parseBinary } from '../protocol/iscsi/text.js';

export interface ChapSecrets {
  /** What initiators must prove (one-way). */
  user: string;
  secret: string;
  /** For mutual CHAP: what the target proves to the initiator. */
  mutualUser?: string;
  mutualSecret?: string;
}

export function chapResponse(id: number, secret: string, challenge: Buffer): Buffer {
  return createHash('md5').update(Buffer.from([id & 0xff])).update(secret, 'utf8').update(challenge).digest();
}

export class ChapExchange {
  readonly id = randomBytes(1)[0]!;
  readonly challenge = randomBytes(16);
  private sentChallenges = new Set<string>();

  constructor(private readonly secrets: ChapSecrets) {
    this.sentChallenges.add(this.challenge.toString('hex'));
  }

  /** Our reply to CHAP_A: MD5 (5), our identifier and challenge. Undefined if MD5 was not offered. */
  offer(algorithms: string): Array<[string, string]> | undefined {
    if (!algorithms.split(',').includes('5')) return undefined;
    return [
      ['CHAP_A', '5'],
      ['CHAP_I', String(this.id)],
      ['CHAP_C', encodeBinary(this.challenge)],
    ];
  }

  /** Check CHAP_N/CHAP_R; with CHAP_I/CHAP_C (mutual), return our proof. Throws ChapFailure. */
  verify(keys: Map<string, string>): Array<[string, string]> {
    const name = keys.get('CHAP_N');
    const r = keys.get('CHAP_R');
    const resp = r !== undefined ? parseBinary(r) : undefined;
    if (name === undefined || !resp) throw new ChapFailure('CHAP_N or CHAP_R missing or malformed');
    const want = chapResponse(this.id, this.secrets.secret, this.challenge);
    if (name !== this.secrets.user || resp.length !== want.length || !timingSafeEqual(resp, want)) throw new ChapFailure(`CHAP authentication failed for user "${name}"`);
    const ci = keys.get('CHAP_I');
    const cc = keys.get('CHAP_C');
    if (ci === undefined && cc === undefined) {
      if (this.secrets.mutualSecret !== undefined) throw new ChapFailure('the target requires mutual CHAP, but the initiator sent no challenge');
      return [];
    }
    const id = Number(ci);
    const challenge = cc !== undefined ? parseBinary(cc) : undefined;
    if (!Number.isInteger(id) || id < 0 || id > 255 || !challenge || challenge.length === 0 || challenge.length > 1024) throw new ChapFailure('malformed CHAP_I or CHAP_C');
    // An initiator that sends back our own challenge would make us answer it for them (reflection).
    if (this.sentChallenges.has(challenge.toString('hex'))) throw new ChapFailure('the initiator reflected our CHAP challenge');
    if (this.secrets.mutualSecret === undefined) throw new ChapFailure('mutual CHAP requested but the target has no mutual secret');
    return [
      ['CHAP_N', this.secrets.mutualUser ?? ''],
      ['CHAP_R', encodeBinary(chapResponse(id, this.secrets.mutualSecret, challenge))],
    ];
  }
}

export class ChapFailure extends Error {
  override readonly name = 'ChapFailure';
  readonly code = 'ECHAP';
}
