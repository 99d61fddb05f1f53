// Differential run: one python3-libnbd script (test/py/differential.py, strict
// mode off) drives the same writes, zeroes, trims and bad requests against
// `nbdkit memory 16M`, the reference server, and against blockmirror with a
// 16 MiB export. Every step's outcome and the hash of every MiB of the final
// image must be identical. Cases where the two may legitimately differ are
// left out of the script, each with a comment saying why.
import { describe, it, expect, beforeAll } from 'vitest';
import path from 'node:path';
import fs from 'node:fs';
import { startNbdkit, startServe, tmpDir } from './helpers/servers.js';
import { startTarget, requireLibnbdPython, runPy } from './helpers/raw.js';

interface Outcome { steps: [string, string][]; hashes: [number, string][]; undefined_bytes: number }

beforeAll(async () => {
  await requireLibnbdPython();
});

describe('differential against nbdkit memory', () => {
  for (const mode of ['sr', 'nosr'] as const) {
    const replies = mode === 'sr' ? 'structured replies' : 'simple replies';
    it(`gives the same data and the same errno for every step as nbdkit (${replies})`, async () => {
      // Fresh exports for each mode: the script assumes a zeroed disk.
      const [ref, sub] = await Promise.all([startNbdkit(['memory', '16M']), startTarget({ sizeMiB: 16 })]);
      try {
        const [want, got] = await Promise.all([
          runPy<Outcome>('differential.py', [ref.uri, mode]),
          runPy<Outcome>('differential.py', [sub.uri, mode]),
        ]);
        // The reference run itself must exercise successes, both error kinds and real data,
        // or the comparison would prove nothing.
        const outcomes = new Set(want.steps.map(([, o]) => o.split(' ')[0]));
        expect([...outcomes].sort()).toEqual(['EINVAL', 'ENOSPC', 'OK']);
        expect(new Set(want.hashes.map(([, h]) => h)).size).toBeGreaterThan(8);
        expect(got.steps).toEqual(want.steps);
        expect(got.hashes).toEqual(want.hashes);
        expect(got.undefined_bytes).toBe(want.undefined_bytes);
      } finally {
        await Promise.all([ref.stop(), sub.stop()]);
      }
    });
  }

  it('gives the same data and the same errno for every step as nbdkit with the --file backend', async () => {
    const dir = tmpDir();
    const [ref, sub] = await Promise.all([
      startNbdkit(['memory', '16M']),
      startServe(['--size', '16MiB', '--file', path.join(dir, 'disk.img')]),
    ]);
    try {
      const [want, got] = await Promise.all([
        runPy<Outcome>('differential.py', [ref.uri, 'sr']),
        runPy<Outcome>('differential.py', [sub.uri, 'sr']),
      ]);
      expect(got.steps).toEqual(want.steps);
      expect(got.hashes).toEqual(want.hashes);
    } finally {
      await Promise.all([ref.stop(), sub.stop()]);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
