// Checks of the memory store's page accounting shared by the write-target tests.
import { expect } from 'vitest';
import type { MemoryDevice } from '../../src/blockdev/memory.js';

/**
 * No slot reserved or held by a view, each slot in one place (a table, the free list, or retired
 * while another volume on the pool has adopted it), no free one held (SlabPool.audit). On a pool
 * of its own, nothing retired either: every slot is the table's or free.
 */
export function expectSlotsBack(mem: MemoryDevice): void {
  expect(mem.reservedBytes).toBe(0);
  expect(mem.heldBytes).toBe(0);
  expect(mem.heldFreeBytes).toBe(0);
  expect(mem.auditPool()).toEqual([]);
  if (!mem.sharesPool) {
    expect(mem.retiredBytes).toBe(0);
    expect(mem.allocatedBytes + mem.freeBytes).toBe(mem.storeBytes);
  }
}
