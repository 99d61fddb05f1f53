// The storage system's cache memory (src/controller/cache/: memory.ts has the design, device.ts
// one volume seen through it).
export { CacheMemory, type CacheMemoryOptions, type CacheStats } from './cache/memory.js';
export { CachedDevice } from './cache/device.js';
