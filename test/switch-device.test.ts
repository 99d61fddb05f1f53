// SwitchDevice (blockdev/switch.ts): what live reconfiguration swaps a volume's pair layer
// through. A hold waits for the I/O in flight; I/O that arrives while held waits, then goes to
// the new device; nothing fails.
import { describe, expect, it } from 'vitest';
import { FilterDevice } from '../src/blockdev/filter.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { SwitchDevice } from '../src/blockdev/switch.js';
import type { Payload } from '../src/blockdev/types.js';

/** Writes wait until `go` is called: an I/O caught in flight. */
class Gated extends FilterDevice {
  private opened!: () => void;
  readonly gate = new Promise<void>((r) => (this.opened = r));
  go(): void {
    this.opened();
  }
  override async write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    await this.gate;
    return super.write(offset, data, fua);
  }
}

describe('SwitchDevice', () => {
  it('holds until the write in flight ends, then sends what waited to the new device', async () => {
    const old = new MemoryDevice(1 << 20);
    const gated = new Gated(old);
    const next = new MemoryDevice(1 << 20);
    const sw = new SwitchDevice(gated);
    const first = sw.write(0, Buffer.alloc(4096, 1));
    let held = false;
    const holding = sw.hold().then(() => (held = true));
    await new Promise((r) => setImmediate(r));
    // The write in flight keeps the hold from completing.
    expect(held).toBe(false);
    const second = sw.write(4096, Buffer.alloc(4096, 2));
    const readBack = Buffer.alloc(4096, 9);
    const read = sw.read(0, readBack);
    gated.go();
    await first;
    await holding;
    expect(held).toBe(true);
    sw.release(next);
    await second;
    await read;
    // Read while held: from the new device (zeroes there), not the old one (ones there).
    expect(readBack.equals(Buffer.alloc(4096))).toBe(true);
    // The first write reached the old device; the one issued while held reached the new one.
    const a = Buffer.alloc(4096);
    await old.read(0, a);
    expect(a.equals(Buffer.alloc(4096, 1))).toBe(true);
    const b = Buffer.alloc(4096);
    await next.read(4096, b);
    expect(b.equals(Buffer.alloc(4096, 2))).toBe(true);
    await old.read(4096, b);
    expect(b.equals(Buffer.alloc(4096))).toBe(true);
  });

  it('passes every call through while open, and a hold with nothing in flight completes at once', async () => {
    const dev = new MemoryDevice(1 << 16);
    const sw = new SwitchDevice(dev);
    await sw.write(0, Buffer.alloc(512, 7));
    await sw.flush();
    await sw.zero(512, 512);
    await sw.trim(1024, 512);
    expect((await sw.extents(0, 1 << 16)).length).toBeGreaterThan(0);
    await sw.hold();
    expect(sw.held).toBe(true);
    sw.release();
    expect(sw.held).toBe(false);
    const back = Buffer.alloc(512);
    await sw.read(0, back);
    expect(back.equals(Buffer.alloc(512, 7))).toBe(true);
  });
});
