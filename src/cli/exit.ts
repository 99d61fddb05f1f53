// Short-lived client commands (xfer send and recv, the cfs client's) exit the moment their work is
// done, with process.exit, rather than by letting the event loop run dry: Node then tears the
// whole isolate down (the heap and its mappings, compiled code, OpenSSL's tables), which took 20 to
// 35 ms after a transfer here and is what process.exit skips. Nothing is lost: what the command
// wrote to stdout and stderr is out already (in Node on Linux, writes to files, pipes and terminals
// are synchronous), its files and connections were closed before, and 'exit' listeners (the code
// cache's) still run.
export function exitDone(): never {
  process.exit(process.exitCode ?? 0);
}
