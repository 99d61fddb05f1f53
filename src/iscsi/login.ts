// The login phase of one connection (RFC 7143 6.3): security stage (AuthMethod, CHAP), then the
// operational stage (negotiation.ts), then full feature phase. Each Login Request gets one Login
// Response; text split over Continue PDUs is collected (bounded) before it is answered.
//
//   CSG -> NSG        condition
//   0 (security) -> 1 or 3   AuthMethod agreed and, for CHAP, the initiator proved the secret
//   1 (operational) -> 3     keys answered; T bit set by the initiator
//   anything else            Initiator error 0x0200
import type { Bhs } from '../protocol/iscsi/bhs.js';
import { LoginStatus, Op, Stage } from '../protocol/iscsi/constants.js';
import { MAX_TEXT_LENGTH, parseText, TextError, type TextPairs } from '../protocol/iscsi/text.js';
import { ChapExchange, ChapFailure, type ChapSecrets } from './chap.js';
import { defaultParams, negotiate, type SessionParams } from './negotiation.js';
import { normaliseName, AllowList, type TargetSpec } from './target.js';

export interface LoginContext {
  findTarget(name: string): TargetSpec | undefined;
  remoteAddress: string;
  /**
   * CHAP for discovery sessions, which name no target: the secrets of the server's targets. An
   * initiator that offers CHAP first authenticates as for a normal session (mutual CHAP where the
   * file has a second line); one that offers None may still discover, and SendTargets shows it
   * only the targets it may log in to.
   */
  discoveryChap?: ChapSecrets;
}

export interface LoginReply {
  transit: boolean;
  csg: number;
  nsg: number;
  status: number;
  text: TextPairs;
}

export interface LoginResult {
  discovery: boolean;
  initiatorName: string;
  isid: number;
  tsih: number;
  cid: number;
  target?: TargetSpec;
  params: SessionParams;
}

export class LoginError extends Error {
  override readonly name = 'LoginError';
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export class LoginPhase {
  readonly params = defaultParams();
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private stage: number = Stage.SECURITY;
  private initiatorName?: string;
  private discovery = false;
  private target?: TargetSpec;
  private chap?: ChapExchange;
  private authMethod?: 'None' | 'CHAP';
  private authenticated = false;
  private chapState: 'none' | 'offered' | 'challenged' = 'none';
  private first?: { isid: number; tsih: number; cid: number };
  /** Set once the login reaches full feature phase. */
  result?: LoginResult;

  constructor(private readonly ctx: LoginContext) {}

  /** Answer one Login Request. Throws LoginError for a login to refuse (the caller answers and closes). */
  handle(req: Bhs<typeof Op.LOGIN_REQ>, data: Buffer): LoginReply {
    if (req.versionMin > 0) throw new LoginError(LoginStatus.UNSUPPORTED_VERSION, `unsupported iSCSI version ${req.versionMin}`);
    if (!this.first) this.first = { isid: req.isid, tsih: req.tsih, cid: req.cid };
    else if (req.isid !== this.first.isid || req.tsih !== this.first.tsih) throw new LoginError(LoginStatus.INITIATOR_ERROR, 'ISID or TSIH changed during login');
    if (req.csg !== this.stage && !(this.stage === Stage.SECURITY && req.csg === Stage.OPERATIONAL)) {
      throw new LoginError(LoginStatus.INITIATOR_ERROR, `login stage ${req.csg} out of order (expected ${this.stage})`);
    }
    if (req.csg === Stage.FULL_FEATURE || req.csg === 2) throw new LoginError(LoginStatus.INITIATOR_ERROR, `invalid current stage ${req.csg}`);
    this.pendingBytes += data.length;
    if (this.pendingBytes > MAX_TEXT_LENGTH) throw new LoginError(LoginStatus.INITIATOR_ERROR, 'login text too long');
    this.pending.push(data);
    if (req.continue) return { transit: false, csg: req.csg, nsg: 0, status: LoginStatus.SUCCESS, text: [] };
    const all = Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    let pairs: TextPairs;
    try {
      pairs = parseText(all);
    } catch (e) {
      throw new LoginError(LoginStatus.INITIATOR_ERROR, (e as TextError).message);
    }
    const keys = new Map(pairs);
    if (!this.initiatorName) this.declare(keys);
    const text: TextPairs = [];

    if (req.csg === Stage.SECURITY) {
      text.push(...this.security(keys));
      // Operational keys sent in the security stage (by an initiator going straight to full
      // feature phase) are answered here, as LIO and tgt do; otherwise they would go unnegotiated.
      text.push(...negotiate(pairs, this.params, this.discovery));
    }
    else if (this.stage === Stage.SECURITY) {
      // Skipping the security stage is allowed only when the target needs no authentication.
      if (this.target?.chap) throw new LoginError(LoginStatus.AUTH_FAILED, 'the target requires CHAP; the initiator skipped authentication');
      this.authenticated = true;
      this.stage = Stage.OPERATIONAL;
    }
    if (req.csg === Stage.OPERATIONAL) {
      for (const k of keys.keys()) if (k.startsWith('CHAP_') || k === 'AuthMethod') throw new LoginError(LoginStatus.INITIATOR_ERROR, `${k} sent in the operational stage`);
      text.push(...negotiate(pairs, this.params, this.discovery));
    }

    let transit = req.transit;
    let nsg = req.nsg;
    if (transit) {
      if (req.csg === Stage.SECURITY && !this.authenticated) transit = false; // CHAP exchange not finished
      if (nsg === 2 || nsg <= req.csg) throw new LoginError(LoginStatus.INITIATOR_ERROR, `invalid next stage ${nsg}`);
    }
    if (transit) {
      if (nsg === Stage.OPERATIONAL) this.stage = Stage.OPERATIONAL;
      if (nsg === Stage.FULL_FEATURE) {
        this.stage = Stage.FULL_FEATURE;
        this.result = {
          discovery: this.discovery,
          initiatorName: this.initiatorName!,
          isid: this.first.isid,
          tsih: this.first.tsih,
          cid: this.first.cid,
          target: this.target,
          params: this.params,
        };
      }
    } else nsg = 0;
    // A normal session learns its portal group tag in the first Login Response (RFC 7143 13.9).
    if (!this.sentTpgt && !this.discovery) {
      text.push(['TargetPortalGroupTag', '1']);
      this.sentTpgt = true;
    }
    return { transit, csg: req.csg, nsg, status: LoginStatus.SUCCESS, text };
  }

  private sentTpgt = false;

  private declare(keys: Map<string, string>): void {
    const name = keys.get('InitiatorName');
    if (!name) throw new LoginError(LoginStatus.MISSING_PARAMETER, 'InitiatorName missing from the first Login Request');
    this.initiatorName = name;
    const type = keys.get('SessionType') ?? 'Normal';
    if (type !== 'Normal' && type !== 'Discovery') throw new LoginError(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, `SessionType ${type} not supported`);
    this.discovery = type === 'Discovery';
    if (!this.discovery) {
      const tname = keys.get('TargetName');
      if (!tname) throw new LoginError(LoginStatus.MISSING_PARAMETER, 'TargetName missing from a normal session login');
      const t = this.ctx.findTarget(normaliseName(tname));
      if (!t) throw new LoginError(LoginStatus.NOT_FOUND, `no target ${tname}`);
      if (!new AllowList(t.allow).allows(name, this.ctx.remoteAddress)) {
        throw new LoginError(LoginStatus.FORBIDDEN, `initiator ${name} from ${this.ctx.remoteAddress} is not on the allow-list of ${t.name}`);
      }
      this.target = t;
    }
  }

  private security(keys: Map<string, string>): TextPairs {
    const out: TextPairs = [];
    const needChap = !!this.target?.chap;
    const am = keys.get('AuthMethod');
    if (am !== undefined && !this.authMethod) {
      const offers = am.split(',');
      // The first method in the initiator's order that we can do (RFC 7143 6.2).
      if (this.discovery && this.ctx.discoveryChap && offers.indexOf('CHAP') >= 0 && (offers.indexOf('None') < 0 || offers.indexOf('CHAP') < offers.indexOf('None'))) {
        this.authMethod = 'CHAP';
      } else if (needChap) {
        if (!offers.includes('CHAP')) throw new LoginError(LoginStatus.AUTH_FAILED, 'the target requires CHAP; the initiator did not offer it');
        this.authMethod = 'CHAP';
      } else if (offers.includes('None')) {
        this.authMethod = 'None';
        this.authenticated = true;
      } else if (offers.includes('CHAP')) {
        // No secret configured: the initiator insists on CHAP, which we cannot check.
        throw new LoginError(LoginStatus.AUTH_FAILED, 'CHAP requested but the target has no CHAP secret');
      } else {
        out.push(['AuthMethod', 'Reject']);
        return out;
      }
      out.push(['AuthMethod', this.authMethod]);
    } else if (am === undefined && !this.authMethod && !needChap) {
      this.authenticated = true;
    }
    if (this.authMethod === 'CHAP') {
      const a = keys.get('CHAP_A');
      if (this.chapState === 'none' && a !== undefined) {
        this.chap = new ChapExchange((this.target?.chap ?? this.ctx.discoveryChap)!);
        const offer = this.chap.offer(a);
        if (!offer) throw new LoginError(LoginStatus.AUTH_FAILED, 'the initiator offered no CHAP algorithm we support (MD5)');
        out.push(...offer);
        this.chapState = 'challenged';
      } else if (this.chapState === 'challenged' && keys.has('CHAP_R')) {
        try {
          out.push(...this.chap!.verify(keys));
        } catch (e) {
          throw new LoginError(LoginStatus.AUTH_FAILED, (e as ChapFailure).message);
        }
        this.authenticated = true;
        this.chapState = 'offered';
      }
    }
    return out;
  }
}
