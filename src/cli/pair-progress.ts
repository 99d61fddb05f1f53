// Following a long pair command to its end: `pair resync --wait` and `pair verify`. Both poll the
// storage system that runs the pair (GET /api/status) and draw what it reports (progress.ts):
//
//   command   done when                                   bar: value / total
//   resync    PAIR and no mirror has an Invalid cluster   clusters the sync daemon copied since the
//                                                         command / those plus the Invalid ones left
//   verify    verify.running is false                     clusters compared / clusters to compare
//
// The resync total grows when host writes mark more clusters Invalid while it runs; the ETA is the
// controller's (copy-rate.ts), not one guessed from the bar.
import { getStatus, pairCommand, type AdminEndpoint } from '../admin/client.js';
import type { PairStatus } from '../controller/status.js';
import { progressBar, humanSeconds } from './progress.js';
import { eta, humanBytes } from './status.js';

const POLL_MS = 200;

async function pairOf(target: AdminEndpoint, name: string, timeoutMs: number): Promise<PairStatus | undefined> {
  const report = await getStatus(target, timeoutMs);
  return report.pairs.find((p) => p.name === name);
}

const copied = (p: PairStatus | undefined) => (p?.mirrors ?? []).reduce((n, m) => n + m.copiedBytes, 0);
const invalid = (p: PairStatus) => p.mirrors.reduce((n, m) => n + m.invalidClusters, 0);
const inSync = (p: PairStatus) => p.state === 'PAIR' && invalid(p) === 0;
/** The slowest mirror's ETA, as the controller computes it. */
const etaOf = (p: PairStatus) => {
  const all = p.mirrors.map((m) => m.etaSeconds);
  return all.some((e) => e === null || e === undefined) ? null : Math.max(0, ...(all as number[]));
};

export interface ResyncResult {
  status: PairStatus;
  /** Bytes the sync daemon copied to the mirrors while the command waited. */
  copiedBytes: number;
  seconds: number;
}

/** Sends resync, then waits until the pair is in sync again (or leaves COPY/PAIR: split, suspended). */
export async function resyncAndWait(target: AdminEndpoint, name: string, timeoutMs: number, json: boolean): Promise<ResyncResult> {
  // The count before the command: the daemon may copy a good part before the first poll.
  const copied0 = copied(await pairOf(target, name, timeoutMs).catch(() => undefined));
  const started = performance.now();
  let status = await pairCommand(target, name, 'resync', timeoutMs);
  const done = (p: PairStatus) => Math.floor((copied(p) - copied0) / p.clusterSize);
  const bar = await progressBar({
    label: `resync ${name}`,
    total: done(status) + invalid(status),
    format: '{value}/{total} clusters | {bytes} | {rate}/s | ETA {eta}',
    payload: { bytes: '0B', rate: '0B', eta: '-' },
    json,
  });
  const draw = (p: PairStatus) =>
    bar?.update(done(p), done(p) + invalid(p), { bytes: humanBytes(copied(p) - copied0), rate: humanBytes(p.mirrors.reduce((n, m) => n + (m.copyRate ?? 0), 0)), eta: eta(etaOf(p)) });
  try {
    // Drawn before the first poll too: a copy done by then still ends the bar at 100%.
    draw(status);
    while (!inSync(status) && (status.state === 'COPY' || status.state === 'PAIR')) {
      await new Promise((r) => setTimeout(r, POLL_MS));
      status = (await pairOf(target, name, timeoutMs)) ?? status;
      draw(status);
    }
  } finally {
    bar?.stop();
  }
  return { status, copiedBytes: copied(status) - copied0, seconds: (performance.now() - started) / 1000 };
}

/** "; resync copied 1024 clusters (64MiB) in 3.2 s", or why it stopped short. */
export function resyncLine(r: ResyncResult): string {
  const what = `${Math.floor(r.copiedBytes / r.status.clusterSize)} clusters (${humanBytes(r.copiedBytes)}) in ${humanSeconds(r.seconds)}`;
  if (inSync(r.status)) return `; resync copied ${what}: the mirrors are in sync`;
  return `; resync stopped in ${r.status.state} after copying ${what}${r.status.error ? `: ${r.status.error}` : ''}`;
}

export function resyncSucceeded(r: ResyncResult): boolean {
  return inSync(r.status);
}

/** Polls until the verify ends. */
export async function followVerify(target: AdminEndpoint, name: string, first: PairStatus, timeoutMs: number, json: boolean): Promise<PairStatus> {
  let status = first;
  const bar = await progressBar({ label: `verify ${name}`, total: status.verify?.total ?? 0, format: '{value}/{total} clusters | ETA {eta_formatted}', json });
  bar?.update(status.verify?.checked ?? 0);
  try {
    while (status.verify?.running) {
      await new Promise((r) => setTimeout(r, POLL_MS));
      status = (await pairOf(target, name, timeoutMs)) ?? status;
      bar?.update(status.verify?.checked ?? 0, status.verify?.total);
    }
  } finally {
    bar?.stop();
  }
  return status;
}
