import { describe, expect, it } from 'vitest';
import { encodeBhs, decodeBhs, type Bhs } from '../src/protocol/iscsi/bhs.js';
import { LoginStatus, Op } from '../src/protocol/iscsi/constants.js';
import { encodeBinary, encodeText, parseBinary } from '../src/protocol/iscsi/text.js';
import { chapResponse } from '../src/iscsi/chap.js';
import { LoginError, LoginPhase } from '../src/iscsi/login.js';
import { defaultParams, negotiate } from '../src/iscsi/negotiation.js';
import type { TargetSpec } from '../src/iscsi/target.js';

const T = 'iqn.2026-12.test:t';
const target = (chap?: TargetSpec['chap']): TargetSpec => ({ name: T, luns: new Map(), chap });

function req(csg: number, nsg: number, transit: boolean): Bhs<typeof Op.LOGIN_REQ> {
  return decodeBhs(encodeBhs({ opcode: Op.LOGIN_REQ, immediate: true, transit, csg, nsg, isid: 7, itt: 1 })) as Bhs<typeof Op.LOGIN_REQ>;
}

describe('operational negotiation', () => {
  it('clamps numbers by the key function and answers booleans by AND/OR', () => {
    const p = defaultParams();
    const r = new Map(negotiate([['MaxBurstLength', '16776192'], ['FirstBurstLength', '1048576'], ['DefaultTime2Wait', '0'], ['ImmediateData', 'Yes'], ['InitialR2T', 'No'], ['MaxRecvDataSegmentLength', '65536'], ['MaxOutstandingR2T', '64']], p, false));
    expect(r.get('MaxBurstLength')).toBe(String(1 << 20));
    expect(r.get('FirstBurstLength')).toBe('262144');
    expect(r.get('ImmediateData')).toBe('Yes');
    expect(r.get('InitialR2T')).toBe('No');
    expect(r.get('MaxOutstandingR2T')).toBe('8');
    expect(r.get('MaxRecvDataSegmentLength')).toBe('262144'); // ours, declared
    expect(p.maxXmitDataSegmentLength).toBe(65536); // theirs, obeyed
  });
  it('answers normal-session keys in a discovery session with Irrelevant, and digests with the first supported offer', () => {
    const p = defaultParams();
    const r = new Map(negotiate([['MaxBurstLength', '512'], ['HeaderDigest', 'CRC32C,None'], ['DataDigest', 'MD5']], p, true));
    expect(r.get('MaxBurstLength')).toBe('Irrelevant');
    expect(r.get('HeaderDigest')).toBe('CRC32C');
    expect(r.get('DataDigest')).toBe('Reject');
    expect(p.headerDigest).toBe(true);
  });
});

describe('login with CHAP', () => {
  const secrets = { user: 'alice', secret: 'initiator-secret', mutualUser: 'array', mutualSecret: 'target-secret-99' };

  function start() {
    const login = new LoginPhase({ findTarget: (n) => (n === T ? target(secrets) : undefined), remoteAddress: '127.0.0.1' });
    const first = login.handle(req(0, 1, false), encodeText([['InitiatorName', 'iqn.x:i'], ['TargetName', T], ['AuthMethod', 'CHAP,None']]));
    expect(new Map(first.text).get('AuthMethod')).toBe('CHAP');
    const ch = new Map(login.handle(req(0, 1, false), encodeText([['CHAP_A', '7,5']])).text);
    expect(ch.get('CHAP_A')).toBe('5');
    return { login, id: Number(ch.get('CHAP_I')), challenge: parseBinary(ch.get('CHAP_C')!)! };
  }

  it('accepts the right response and, for mutual CHAP, proves the target secret', () => {
    const { login, id, challenge } = start();
    const mine = Buffer.from('0123456789abcdef');
    const r = login.handle(req(0, 1, true), encodeText([['CHAP_N', 'alice'], ['CHAP_R', encodeBinary(chapResponse(id, secrets.secret, challenge))], ['CHAP_I', '9'], ['CHAP_C', encodeBinary(mine)]]));
    const m = new Map(r.text);
    expect(r.transit).toBe(true);
    expect(m.get('CHAP_N')).toBe('array');
    expect(parseBinary(m.get('CHAP_R')!)!.equals(chapResponse(9, secrets.mutualSecret, mine))).toBe(true);
  });

  it('refuses a wrong response, a reflected challenge and a skipped security stage with 0x0201', () => {
    const a = start();
    expect(() => a.login.handle(req(0, 1, true), encodeText([['CHAP_N', 'alice'], ['CHAP_R', encodeBinary(chapResponse(a.id, 'wrong', a.challenge))]]))).toThrow(LoginError);
    const b = start();
    const reflect = () => b.login.handle(req(0, 1, true), encodeText([['CHAP_N', 'alice'], ['CHAP_R', encodeBinary(chapResponse(b.id, secrets.secret, b.challenge))], ['CHAP_I', String(b.id)], ['CHAP_C', encodeBinary(b.challenge)]]));
    expect(reflect).toThrow(/reflected/);
    const c = new LoginPhase({ findTarget: () => target(secrets), remoteAddress: '127.0.0.1' });
    let status = 0;
    try {
      c.handle(req(1, 3, true), encodeText([['InitiatorName', 'iqn.x:i'], ['TargetName', T]]));
    } catch (e) {
      status = (e as LoginError).status;
    }
    expect(status).toBe(LoginStatus.AUTH_FAILED);
  });

  it('answers an unknown target with 0x0203 and a missing InitiatorName with 0x0207', () => {
    const l = new LoginPhase({ findTarget: () => undefined, remoteAddress: '127.0.0.1' });
    expect(() => l.handle(req(0, 1, false), encodeText([['InitiatorName', 'iqn.x:i'], ['TargetName', 'iqn.2026-12.none:x']]))).toThrow(expect.objectContaining({ status: LoginStatus.NOT_FOUND }));
    const m = new LoginPhase({ findTarget: () => undefined, remoteAddress: '127.0.0.1' });
    expect(() => m.handle(req(0, 1, false), encodeText([['TargetName', T]]))).toThrow(expect.objectContaining({ status: LoginStatus.MISSING_PARAMETER }));
  });
});
