// Operational text negotiation (RFC 7143 section 13 and 6.2): the target's answer to each key an
// initiator offers. Numbers are clamped by the key's function, lists answered with our first
// match, and the rest answered as the RFC says:
//
//   key                        kind         result                     our value
//   HeaderDigest, DataDigest   list         first offered we support   None, CRC32C
//   MaxConnections             min          1 (ERL 0, one connection)  1
//   InitialR2T                 or           Yes if either says Yes     No
//   ImmediateData              and          Yes if both say Yes        Yes
//   MaxRecvDataSegmentLength   declarative  the initiator's receive limit (we declare ours)
//   MaxBurstLength             min          512..2^24-1                1 MiB
//   FirstBurstLength           min          512..2^24-1, <= MaxBurst   256 KiB
//   DefaultTime2Wait           max          0..3600                    0
//   DefaultTime2Retain         min          0..3600                    0
//   MaxOutstandingR2T          min          1..65535                   8
//   DataPDUInOrder, DataSequenceInOrder  or  Yes                       Yes
//   ErrorRecoveryLevel         min          0..2                       0
//   IFMarker, OFMarker         and          No (removed in RFC 7143)   No
//   IFMarkInt, OFMarkInt       -            Irrelevant
//   unknown key (also X-...)   -            NotUnderstood
//   out of range / bad syntax  -            Reject
import { parseNumber, type TextPairs } from '../protocol/iscsi/text.js';

export interface SessionParams {
  headerDigest: boolean;
  dataDigest: boolean;
  initialR2T: boolean;
  immediateData: boolean;
  /** The initiator's receive limit: our Data-In and text PDUs stay within it. */
  maxXmitDataSegmentLength: number;
  /** Ours, declared to the initiator. */
  maxRecvDataSegmentLength: number;
  maxBurstLength: number;
  firstBurstLength: number;
  maxOutstandingR2T: number;
  errorRecoveryLevel: number;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  dataPduInOrder: boolean;
  dataSequenceInOrder: boolean;
  maxConnections: number;
}

export const TARGET_LIMITS = {
  maxRecvDataSegmentLength: 262144,
  maxBurstLength: 1 << 20,
  firstBurstLength: 262144,
  maxOutstandingR2T: 8,
};

/** RFC 7143 defaults, which hold for every key the initiator does not negotiate. */
export function defaultParams(): SessionParams {
  return {
    headerDigest: false,
    dataDigest: false,
    initialR2T: true,
    immediateData: true,
    maxXmitDataSegmentLength: 8192,
    maxRecvDataSegmentLength: TARGET_LIMITS.maxRecvDataSegmentLength,
    maxBurstLength: 262144,
    firstBurstLength: 65536,
    maxOutstandingR2T: 1,
    errorRecoveryLevel: 0,
    defaultTime2Wait: 2,
    defaultTime2Retain: 20,
    dataPduInOrder: true,
    dataSequenceInOrder: true,
    maxConnections: 1,
  };
}

/** Keys that are declarations, not negotiation: the login layer handles them. */
const DECLARATIVE = new Set(['InitiatorName', 'InitiatorAlias', 'TargetName', 'SessionType', 'AuthMethod', 'TargetAlias', 'TargetAddress', 'TargetPortalGroupTag']);

const NUMERIC: Record<string, { min: number; max: number; fn: 'min' | 'max' | 'decl'; ours: () => number; set: (p: SessionParams, v: number) => void }> = {
  MaxConnections: { min: 1, max: 65535, fn: 'min', ours: () => 1, set: (p, v) => (p.maxConnections = v) },
  MaxRecvDataSegmentLength: { min: 512, max: 0xffffff, fn: 'decl', ours: () => TARGET_LIMITS.maxRecvDataSegmentLength, set: (p, v) => (p.maxXmitDataSegmentLength = v) },
  MaxBurstLength: { min: 512, max: 0xffffff, fn: 'min', ours: () => TARGET_LIMITS.maxBurstLength, set: (p, v) => (p.maxBurstLength = v) },
  FirstBurstLength: { min: 512, max: 0xffffff, fn: 'min', ours: () => TARGET_LIMITS.firstBurstLength, set: (p, v) => (p.firstBurstLength = v) },
  DefaultTime2Wait: { min: 0, max: 3600, fn: 'max', ours: () => 0, set: (p, v) => (p.defaultTime2Wait = v) },
  DefaultTime2Retain: { min: 0, max: 3600, fn: 'min', ours: () => 0, set: (p, v) => (p.defaultTime2Retain = v) },
  MaxOutstandingR2T: { min: 1, max: 65535, fn: 'min', ours: () => TARGET_LIMITS.maxOutstandingR2T, set: (p, v) => (p.maxOutstandingR2T = v) },
  ErrorRecoveryLevel: { min: 0, max: 2, fn: 'min', ours: () => 0, set: (p, v) => (p.errorRecoveryLevel = v) },
};

const BOOLEAN: Record<string, { fn: 'and' | 'or'; ours: boolean; set: (p: SessionParams, v: boolean) => void }> = {
  InitialR2T: { fn: 'or', ours: false, set: (p, v) => (p.initialR2T = v) },
  ImmediateData: { fn: 'and', ours: true, set: (p, v) => (p.immediateData = v) },
  DataPDUInOrder: { fn: 'or', ours: true, set: (p, v) => (p.dataPduInOrder = v) },
  DataSequenceInOrder: { fn: 'or', ours: true, set: (p, v) => (p.dataSequenceInOrder = v) },
  IFMarker: { fn: 'and', ours: false, set: () => undefined },
  OFMarker: { fn: 'and', ours: false, set: () => undefined },
};

/** Keys meaningless in a discovery session (answered Irrelevant there). */
const NORMAL_ONLY = new Set(['MaxBurstLength', 'FirstBurstLength', 'InitialR2T', 'ImmediateData', 'MaxOutstandingR2T', 'DataPDUInOrder', 'DataSequenceInOrder', 'DefaultTime2Wait', 'DefaultTime2Retain']);

/**
 * Answer the operational keys of one login or text PDU, updating `params`. Declarative login
 * keys are skipped (the caller handles them). Returns the reply pairs.
 */
export function negotiate(offered: TextPairs, params: SessionParams, discovery: boolean): TextPairs {
  const reply: TextPairs = [];
  for (const [key, value] of offered) {
    if (DECLARATIVE.has(key) || key.startsWith('CHAP_')) continue;
    if (discovery && NORMAL_ONLY.has(key)) {
      reply.push([key, 'Irrelevant']);
      continue;
    }
    if (key === 'HeaderDigest' || key === 'DataDigest') {
      const offers = value.split(',');
      if (offers.some((o) => !/^[A-Za-z0-9.\-+@_]+$/.test(o))) {
        reply.push([key, 'Reject']);
        continue;
      }
      const pick = offers.find((o) => o === 'None' || o === 'CRC32C');
      if (!pick) {
        reply.push([key, 'Reject']);
        continue;
      }
      if (key === 'HeaderDigest') params.headerDigest = pick === 'CRC32C';
      else params.dataDigest = pick === 'CRC32C';
      reply.push([key, pick]);
      continue;
    }
    const num = NUMERIC[key];
    if (num) {
      const v = parseNumber(value);
      if (Number.isNaN(v) || v < num.min || v > num.max) {
        reply.push([key, 'Reject']);
        continue;
      }
      if (num.fn === 'decl') {
        num.set(params, v);
        reply.push([key, String(num.ours())]);
        continue;
      }
      const result = num.fn === 'min' ? Math.min(v, num.ours()) : Math.max(v, num.ours());
      num.set(params, result);
      reply.push([key, String(result)]);
      continue;
    }
    const bool = BOOLEAN[key];
    if (bool) {
      if (value !== 'Yes' && value !== 'No') {
        reply.push([key, 'Reject']);
        continue;
      }
      const v = value === 'Yes';
      const result = bool.fn === 'and' ? v && bool.ours : v || bool.ours;
      bool.set(params, result);
      reply.push([key, result ? 'Yes' : 'No']);
      continue;
    }
    if (key === 'IFMarkInt' || key === 'OFMarkInt') {
      reply.push([key, 'Irrelevant']);
      continue;
    }
    if (key === 'TaskReporting') {
      reply.push([key, 'RFC3720']);
      continue;
    }
    if (key === 'iSCSIProtocolLevel') {
      const v = parseNumber(value);
      reply.push([key, Number.isNaN(v) || v > 31 ? 'Reject' : String(Math.min(v, 1))]);
      continue;
    }
    reply.push([key, 'NotUnderstood']);
  }
  // FirstBurstLength may not exceed MaxBurstLength (13.14).
  if (params.firstBurstLength > params.maxBurstLength) params.firstBurstLength = params.maxBurstLength;
  return reply;
}
