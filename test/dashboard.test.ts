// The dashboard in a real browser (Debian's chromium, driven by
// playwright-core) against a running `blockmirror up`: two storage systems in
// one process, and a third one in the YAML that is not running.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, type NbdClient } from '../src/nbd/client.js';
import { freePort, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';
import type { SSReport } from '../src/controller/status.js';
import { EtcdCluster } from './helpers/etcd.js';
import { SSProcess, inSync, loopbackAddrs, twoSSYaml, writeConfig } from './helpers/remote.js';

const MiB = 1024 * 1024;
// The README's picture is refreshed on purpose only (`npm run screenshot`); a plain test run
// writes to a temporary file, so it never leaves the work tree changed.
const SCREENSHOT = process.env.BLOCKMIRROR_SCREENSHOT ?? path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'bm-shot-')), 'dashboard.png');

interface Ports {
  nbd: number[];
  admin: number[];
}

// pair1's sync daemon copies one 64 KiB cluster a second, so what a write
// leaves Invalid stays on the heatmap long enough to be seen.
function yaml(p: Ports): string {
  return `
clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd[0]}
    admin: 127.0.0.1:${p.admin[0]}
    cache: { size: 16MiB }
    volumes:
      - { id: 8, size: 64MiB }
      - { id: 7, size: 64MiB }
      - { id: 5, size: 32MiB }
      - { id: 6, size: 32MiB }
      - { id: 9, size: 16MiB }
  - id: 2
    nbd: 127.0.0.1:${p.nbd[1]}
    admin: 127.0.0.1:${p.admin[1]}
    volumes:
      - { id: 1, size: 16MiB }
      - { id: 2, size: 16MiB }
  - id: 3
    nbd: 127.0.0.1:${p.nbd[2]}
    admin: 127.0.0.1:${p.admin[2]}
    volumes:
      - { id: 1, size: 16MiB }
pairs:
  - { name: pair1, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ], syncRate: 64KiB }
  - { name: pair2, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 6 } ] }
  - { name: pair3, mode: async, master: { ss: 2, vol: 1 }, mirrors: [ { ss: 2, vol: 2 } ] }
`;
}

let ports: Ports;
let cluster: RunningCluster;
let browser: Browser;
let page: Page;
let nbd: NbdClient;

beforeAll(async () => {
  ports = { nbd: [await freePort(), await freePort(), await freePort()], admin: [await freePort(), await freePort(), await freePort()] };
  const file = path.join(tmpDir('bm-dash-'), 'cluster.yaml');
  fs.writeFileSync(file, yaml(ports));
  [cluster, browser] = await Promise.all([
    startUp(file, [ports.nbd[0]!, ports.admin[0]!, ports.nbd[1]!, ports.admin[1]!], ['--only', '1,2']),
    chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] }),
  ]);
  page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  nbd = await connect(`nbd://127.0.0.1:${ports.nbd[0]}/vol8`);
});

afterAll(async () => {
  await nbd?.close();
  await browser?.close();
  await cluster?.stop();
});

const card = (pair: string) => `article[data-pair="${pair}"]`;

/** Pixels of a mirror's heatmap drawn in an Invalid colour (red above green), once the canvas is drawn. */
async function invalidPixels(pair: string): Promise<number> {
  const canvas = `canvas[data-pair="${pair}"]`;
  await page.waitForFunction((sel) => ((document.querySelector(sel) as HTMLCanvasElement | null)?.width ?? 0) > 0, canvas);
  return page.$eval(canvas, (c: HTMLCanvasElement) => {
    const d = c.getContext('2d')!.getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i]! > d[i + 1]!) n++;
    return n;
  });
}

/** Click a pair's command button and answer its confirmation. */
async function command(pair: string, cmd: string, answer: 'accept' | 'dismiss' = 'accept'): Promise<string> {
  let asked = '';
  page.once('dialog', (d) => {
    asked = d.message();
    void (answer === 'accept' ? d.accept() : d.dismiss());
  });
  await page.click(`${card(pair)} button[data-command="${cmd}"]`);
  return asked;
}

describe('dashboard', () => {
  it('shows the storage systems of the whole cluster, an unreachable one as such, and every pair', async () => {
    await page.goto(`http://127.0.0.1:${ports.admin[0]}/#token=${process.env.BLOCKMIRROR_ADMIN_TOKEN}`);
    await page.waitForSelector('#live.live');
    for (const p of ['pair1', 'pair2', 'pair3']) await page.waitForSelector(card(p));
    await expect.poll(() => page.textContent('#systems tr[data-ss="3"]')).toMatch(/unreachable.*storage system 3 .* is not reachable/);
    expect(await page.textContent('#systems tr[data-ss="2"]')).toContain('up');
    expect(await page.textContent(`${card('pair1')} .state`)).toBe('PAIR');
    expect(await page.textContent(`${card('pair1')} .facts`)).toContain('async');
    // pair3 runs on SS 2: no buttons here, a link to SS 2's dashboard instead.
    expect(await page.isVisible(`${card('pair3')} .commands`)).toBe(false);
    expect(await page.getAttribute(`${card('pair3')} a.elsewhere`, 'href')).toBe(`http://127.0.0.1:${ports.admin[1]}/`);
    const volumes = await page.textContent('#volumes');
    for (const v of ['vol8', 'vol7', 'vol9', 'vol1', 'vol2']) expect(volumes).toContain(v);
  });

  it('turns heatmap cells Invalid when a write lands on an async master, with progress and an ETA', async () => {
    expect(await invalidPixels('pair1')).toBe(0);
    await nbd.pwrite(Buffer.alloc(MiB, 0x11), 8 * MiB);
    await nbd.pwrite(Buffer.alloc(2 * MiB, 0x22), 40 * MiB);
    await expect.poll(() => invalidPixels('pair1'), { timeout: 5000 }).toBeGreaterThan(0);
    // Both writes went past SS 1's cache memory, straight to the volume (its bypass is 1 MiB).
    const pastCache = async () => {
      const m = /^([\d.]+) MiB$/.exec((await page.textContent('#systems tr[data-ss="1"] td.bypassed')) ?? '');
      return m ? Number(m[1]) : 0;
    };
    await expect.poll(pastCache, { timeout: 5000 }).toBeGreaterThanOrEqual(3);
    // The frame that first shows the Invalid cells may still carry the state from before the copy
    // began (a CI run under load read PAIR there): wait for the state, as for the label below.
    await expect.poll(() => page.textContent(`${card('pair1')} .state`), { timeout: 5000 }).toBe('COPY');
    await expect.poll(() => page.textContent(`${card('pair1')} .mirror-label`), { timeout: 5000 }).toMatch(/% in sync, \d+ invalid clusters .*ETA \d/);
  });

  it("draws each pair's throughput sparkline from the samples the admin API returns, with points after writes", async () => {
    await nbd.pwrite(Buffer.alloc(2 * MiB, 0x44), 16 * MiB);
    // The API: the master's storage system keeps one sample a second, bytes per second, oldest first.
    const written = async () => {
      const report = (await (await adminFetch(`http://127.0.0.1:${ports.admin[0]}/api/status`)).json()) as SSReport;
      const t = report.pairs.find((p) => p.name === 'pair1')?.throughput;
      return t ? { intervalMs: t.intervalMs, peak: Math.max(...t.write), lengths: [t.read.length, t.write.length, t.copy.length] } : undefined;
    };
    await expect.poll(async () => (await written())?.peak ?? 0, { timeout: 5000 }).toBeGreaterThan(0);
    const t = (await written())!;
    expect(t.intervalMs).toBe(1000);
    expect(new Set(t.lengths).size).toBe(1);
    // The page: the host I/O line has a point per sample, and some above the baseline.
    const points = async () => {
      const attr = (await page.getAttribute(`${card('pair1')} svg.sparkline polyline.spark-io`, 'points')) ?? '';
      return attr.split(' ').filter(Boolean).map((xy) => xy.split(',').map(Number) as [number, number]);
    };
    await expect.poll(async () => (await points()).length, { timeout: 5000 }).toBeGreaterThan(1);
    const height = Number(await page.getAttribute(`${card('pair1')} svg.sparkline`, 'height'));
    await expect.poll(async () => Math.min(...(await points()).map(([, y]) => y)), { timeout: 5000 }).toBeLessThan(height / 2);
    expect(await page.isVisible(`${card('pair1')} .throughput`)).toBe(true);
    expect(await page.textContent(`${card('pair1')} .spark-label`)).toMatch(/^host I\/O .*\/s · copy .*\/s · peak .*\/s in the last \d+ s$/);
  });

  it('splits a pair after a confirmation, and sends nothing when it is dismissed', async () => {
    expect(await command('pair2', 'split', 'dismiss')).toMatch(/^Split pair2\?/);
    await new Promise((r) => setTimeout(r, 600));
    expect(await page.textContent(`${card('pair2')} .state`)).toBe('PAIR');

    await command('pair2', 'split');
    await expect.poll(() => page.textContent('#message')).toBe('split pair2: PSUS');
    await expect.poll(() => page.textContent(`${card('pair2')} .state`)).toBe('PSUS');
  });

  it('saves a screenshot for the README, then resyncs the split pair', async () => {
    // Writes on the split pair's master are tracked in its bitmap, and show as I/O rates.
    const vol5 = await connect(`nbd://127.0.0.1:${ports.nbd[0]}/vol5`);
    await vol5.pwrite(Buffer.alloc(4 * MiB, 0x33), 4 * MiB);
    await vol5.close();
    await expect.poll(() => invalidPixels('pair2')).toBeGreaterThan(0);
    // The picture shows those writes on pair2's sparkline too (sampled once a second).
    await expect.poll(() => page.textContent(`${card('pair2')} .spark-label`), { timeout: 5000 }).not.toMatch(/peak 0 B\/s/);
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    expect(fs.statSync(SCREENSHOT).size).toBeGreaterThan(10_000);

    await command('pair2', 'resync');
    await expect.poll(() => page.textContent(`${card('pair2')} .state`), { timeout: 10_000 }).toBe('PAIR');
    await expect.poll(() => invalidPixels('pair2')).toBe(0);
  });

  it('shows the server\'s error line when a command is refused', async () => {
    await command('pair1', 'split'); // pair1 is in COPY: the mirror is not a consistent copy yet
    await expect.poll(() => page.getAttribute('#message', 'class')).toBe('error');
    expect(await page.textContent('#message')).toMatch(/^split pair1: .*COPY/);
    await command('pair2', 'verify');
    await expect.poll(() => page.textContent('#message')).toMatch(/^verify pair2: /);
  });

  it('shows the same cluster from the other storage system', async () => {
    await page.goto(`http://127.0.0.1:${ports.admin[1]}/#token=${process.env.BLOCKMIRROR_ADMIN_TOKEN}`);
    for (const p of ['pair1', 'pair2', 'pair3']) await page.waitForSelector(card(p));
    expect(await page.textContent('#self')).toContain('storage system 2');
    expect(await page.isVisible(`${card('pair3')} .commands`)).toBe(true);
    expect(await page.isVisible(`${card('pair1')} .commands`)).toBe(false);
    await expect.poll(() => invalidPixels('pair1')).toBeGreaterThan(0); // pair1's heatmap, fetched from SS 1
  });
});

describe('dashboard of a cluster on etcd', () => {
  const cells = (p: Page, row: string) => p.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent));

  it('shows the etcd tables: storage systems with their lease, logical volumes with master and epoch, mirrors, and the failover history', async () => {
    const etcd = await EtcdCluster.start(1);
    const ss: SSProcess[] = [];
    const p = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    try {
      const [a, b] = await loopbackAddrs();
      const yaml = twoSSYaml(a, b, [{ name: 'pair1', mode: 'sync', vol: 1 }], { peerTimeout: '1s' });
      const cfg = writeConfig(`${yaml}etcd:\n  endpoints: [ ${etcd.endpoints.join(', ')} ]\n  prefix: /bm-dash\n  leaseTtl: 2s\n`);
      ss.push(new SSProcess(1, cfg.file, a), new SSProcess(2, cfg.file, b));
      for (const s of ss) await s.start(60_000);
      await ss[0]!.waitPair('pair1', inSync, 'in sync', 30_000);
      await p.goto(`http://127.0.0.1:${b.admin}/#token=${process.env.BLOCKMIRROR_ADMIN_TOKEN}`);
      await p.waitForSelector('#etcd:not([hidden]) #etcd-volumes tr[data-lv="pair1"]');
      await expect.poll(() => cells(p, '#etcd-volumes tr[data-lv="pair1"]'), { timeout: 10_000 }).toEqual(['pair1', 'ss1/vol1', '1', 'sync', 'PAIR', 'ss2/vol1 PAIR']);
      expect((await cells(p, '#etcd-systems tr[data-ss="1"]')).slice(0, 3)).toEqual(['SS 1', 'up', `127.0.0.1:${a.nbd}`]);
      expect(await p.$$('#etcd-history tbody tr')).toHaveLength(0);

      // The master's storage system dies: its lease ends, ss2 takes pair1 over in epoch 2.
      await ss[0]!.kill();
      await expect.poll(() => cells(p, '#etcd-volumes tr[data-lv="pair1"]').then((c) => c.slice(0, 3)), { timeout: 30_000 }).toEqual(['pair1', 'ss2/vol1', '2']);
      await expect.poll(() => cells(p, '#etcd-systems tr[data-ss="1"]').then((c) => c[1]), { timeout: 10_000 }).toBe('no lease');
      expect(await p.getAttribute('#etcd-systems tr[data-ss="1"]', 'class')).toBe('down');
      await p.waitForSelector('#etcd-history tr[data-lv="pair1"][data-epoch="2"]');
      const [time, ...rest] = await cells(p, '#etcd-history tr[data-epoch="2"]');
      expect(rest).toEqual(['pair1', '2', 'ss1/vol1', 'ss2/vol1', 'storage system 1 lost its etcd lease']);
      expect(Number.isNaN(Date.parse(time!))).toBe(false);
    } finally {
      await p.close();
      await Promise.all(ss.map((s) => s.kill()));
      await etcd.stop();
    }
  }, 120_000);

  it('hides the etcd section for a cluster without etcd', async () => {
    await page.goto(`http://127.0.0.1:${ports.admin[0]}/#token=${process.env.BLOCKMIRROR_ADMIN_TOKEN}`);
    await page.waitForSelector('#live.live');
    await page.waitForSelector(card('pair1'));
    expect(await page.isHidden('#etcd')).toBe(true);
  });
});
