// Checks of the memory store's page accounting shared by the write-target tests.
import { expect } from 'vitest';
import type { MemoryDevice } from '../../src/blockdev/memory.js';

/** No slot reserved, held or retired, each slot in one place (the table or the free list), no free one held. */
export function expectSlotsBack(mem: MemoryDevice): void {
  expect(mem.reservedBytes).toBe(0);
  expect(mem.heldBytes).toBe(0);
  expect(mem.retiredBytes).toBe(0);
  expect(mem.heldFreeBytes).toBe(0);
  expect(mem.allocatedBytes + mem.freeBytes).toBe(mem.storeBytes);
}
