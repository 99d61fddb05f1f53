// Progress bars of the long commands (pair resync --wait, pair verify, svol init/resync/restore/
// verify --wait, cfs put/get of large files), drawn with cli-progress on stderr. The numbers come
// from what the work reports (the controller's status through the admin API, or the bytes the CFS
// client moved), never from a guess.
//
//   stderr        --json   while it runs           at the end
//   terminal      no       a bar, redrawn in place  the bar stays, at 100% when the work is done
//   terminal      yes      nothing                  the command's JSON on stdout
//   not terminal  any      nothing                  one summary line (or the JSON)
//
// A bar never goes to a pipe or a file: a log full of carriage returns and escape codes helps no one.

export interface ProgressBar {
  /** `value` of `total` done. The total may change: host writes during a resync add work. */
  update(value: number, total?: number, payload?: Record<string, string>): void;
  /** Draws the last state and ends the line. */
  stop(): void;
}

export interface ProgressOptions {
  /** What runs, e.g. "resync pair1". */
  label: string;
  total: number;
  /** The bar's text after "label [bar] N% | ", with cli-progress tokens ({value}, {total}, {eta_formatted}) and payload tokens. */
  format: string;
  payload?: Record<string, string>;
  /** The command prints JSON: no bar. */
  json?: boolean;
}

/** Whether a bar would be drawn: stderr is a terminal and the command does not print JSON. */
export function wantsBar(json?: boolean): boolean {
  return json !== true && process.stderr.isTTY === true;
}

/** A bar on stderr, or undefined when none is drawn (table above). */
export async function progressBar(opts: ProgressOptions): Promise<ProgressBar | undefined> {
  if (!wantsBar(opts.json)) return undefined;
  const { SingleBar, Presets } = await import('cli-progress');
  const bar = new SingleBar(
    { format: `${opts.label} [{bar}] {percentage}% | ${opts.format}`, stream: process.stderr, hideCursor: true, clearOnComplete: false },
    Presets.shades_classic,
  );
  bar.start(opts.total, 0, opts.payload ?? {});
  return {
    update(value, total, payload) {
      if (total !== undefined) bar.setTotal(total);
      bar.update(value, payload ?? {});
    },
    stop: () => bar.stop(),
  };
}

/** Seconds, as progress lines show them: "3.2 s", "4 min 05 s". */
export function humanSeconds(s: number): string {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${String(Math.round(s - m * 60)).padStart(2, '0')} s`;
}

/** 512B, 64KiB, 1.5GiB: binary units, one decimal when not exact. */
export function humanBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  // 1023.96 would print as "1024.0"; go up a unit before rounding can get there.
  while (v >= 1023.95 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return Number.isInteger(v) ? `${v}${units[i]}` : `${v.toFixed(1)}${units[i]}`;
}
