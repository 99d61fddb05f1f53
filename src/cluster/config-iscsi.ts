// A storage system's iSCSI keys (docs/iscsi.md): its target, and the targets of its own that
// volumes may name, each with CHAP and an allow-list.
//
//   key (storage system, or a volume with iscsiTarget)   meaning
//   iscsiChap: {user, secret, mutualUser?, mutualSecret?} CHAP secrets inline
//   iscsiChapFile: FILE                                   the same from a file (USER:SECRET lines)
//   iscsiAllow: [IQN pattern | CIDR, ...]                 who may log in
// A volume's target without its own keys takes the storage system's. Error messages name keys,
// never secrets.
import path from 'node:path';
import type { ChapSecrets } from '../iscsi/chap.js';
import type { IscsiConfig, Parsed, RawProblem, Segment, VolumeConfig } from './config.js';

type ParsedSs = Parsed['storageSystems'][number];
type ParsedChap = NonNullable<ParsedSs['iscsiChap']>;

function chapOf(c: ParsedChap, at: Segment[], problems: RawProblem[]): ChapSecrets {
  const out: ChapSecrets = { user: c.user, secret: c.secret };
  if ((c.mutualUser === undefined) !== (c.mutualSecret === undefined)) {
    problems.push({ path: at, message: 'give mutualUser and mutualSecret together (mutual CHAP), or neither' });
  } else if (c.mutualUser !== undefined && c.mutualSecret !== undefined) {
    if (c.mutualSecret === c.secret) problems.push({ path: [...at, 'mutualSecret'], message: "the mutual CHAP secret must differ from the initiator's (RFC 7143 12.1.3)" });
    out.mutualUser = c.mutualUser;
    out.mutualSecret = c.mutualSecret;
  }
  return out;
}

/** The auth keys of one target, checked: inline or file, not both. */
function auth(
  keys: { iscsiChap?: ParsedChap | undefined; iscsiChapFile?: string | undefined; iscsiAllow?: string[] | undefined },
  at: Segment[],
  baseDir: string,
  problems: RawProblem[],
): { chap?: ChapSecrets; chapFile?: string; allow?: string[] } {
  const out: { chap?: ChapSecrets; chapFile?: string; allow?: string[] } = {};
  if (keys.iscsiChap !== undefined && keys.iscsiChapFile !== undefined) {
    problems.push({ path: [...at, 'iscsiChap'], message: 'give iscsiChap (secrets inline) or iscsiChapFile (secrets in a file), not both' });
  }
  if (keys.iscsiChap !== undefined) out.chap = chapOf(keys.iscsiChap, [...at, 'iscsiChap'], problems);
  else if (keys.iscsiChapFile !== undefined) out.chapFile = path.resolve(baseDir, keys.iscsiChapFile);
  if (keys.iscsiAllow !== undefined) out.allow = keys.iscsiAllow;
  return out;
}

export function buildIscsi(ss: ParsedSs, i: number, baseDir: string, problems: RawProblem[]): { iscsi?: IscsiConfig; volumes: VolumeConfig[] } {
  const at: Segment[] = ['storageSystems', i];
  let iscsi: IscsiConfig | undefined;
  if (ss.iscsi !== undefined) {
    iscsi = { listen: ss.iscsi, target: ss.iscsiTarget ?? `iqn.2026-12.org.blockmirror:ss${ss.id}`, ...auth(ss, at, baseDir, problems) };
  } else if (ss.iscsiTarget !== undefined || ss.iscsiChap !== undefined || ss.iscsiChapFile !== undefined || ss.iscsiAllow !== undefined) {
    problems.push({ path: [...at, 'iscsi'], message: 'iscsiTarget, iscsiChap, iscsiChapFile and iscsiAllow need iscsi: HOST:PORT on the same storage system' });
  }
  const volumes = ss.volumes.map((v, j): VolumeConfig => {
    const vat: Segment[] = [...at, 'volumes', j];
    const out: VolumeConfig = { id: v.id, size: v.size };
    if (v.iscsiTarget !== undefined) out.iscsiTarget = v.iscsiTarget;
    if (v.allow !== undefined) out.allow = v.allow;
    const own = v.iscsiChap !== undefined || v.iscsiChapFile !== undefined || v.iscsiAllow !== undefined;
    if (!own) return out;
    if (v.iscsiTarget === undefined) {
      problems.push({ path: vat, message: "iscsiChap, iscsiChapFile and iscsiAllow on a volume apply to a target of its own: add iscsiTarget, or set them on the storage system" });
      return out;
    }
    if (ss.iscsi === undefined) problems.push({ path: vat, message: 'the volume has iSCSI keys but its storage system has no iscsi: HOST:PORT' });
    const a = auth(v, vat, baseDir, problems);
    if (a.chap) out.iscsiChap = a.chap;
    if (a.chapFile) out.iscsiChapFile = a.chapFile;
    if (a.allow) out.iscsiAllow = a.allow;
    return out;
  });
  // Volumes naming one target share it: they must agree on its CHAP and allow-list.
  const byTarget = new Map<string, { vol: number; auth: string }>();
  for (const v of volumes) {
    if (v.iscsiTarget === undefined) continue;
    const key = JSON.stringify([v.iscsiChap ?? null, v.iscsiChapFile ?? null, v.iscsiAllow ?? null]);
    const seen = byTarget.get(v.iscsiTarget);
    if (!seen) byTarget.set(v.iscsiTarget, { vol: v.id, auth: key });
    else if (seen.auth !== key) {
      problems.push({ path: [...at, 'volumes', volumes.indexOf(v)], message: `volumes ${seen.vol} and ${v.id} share target ${v.iscsiTarget}: give both the same iscsiChap, iscsiChapFile and iscsiAllow` });
    }
  }
  // A volume naming the storage system's own target would change the auth of every LUN there.
  const j = iscsi ? volumes.findIndex((v) => v.iscsiTarget === iscsi.target && (v.iscsiChap || v.iscsiChapFile || v.iscsiAllow)) : -1;
  if (iscsi && j >= 0) problems.push({ path: [...at, 'volumes', j], message: `target ${iscsi.target} is the storage system's: set its CHAP and allow-list with the storage system's keys` });
  return iscsi ? { iscsi, volumes } : { volumes };
}
