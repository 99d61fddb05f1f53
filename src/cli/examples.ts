// One example per command, shown at the end of its --help. Kept in one table, by command path, so
// that a new command without one is easy to spot (test/cli-help.test.ts walks the tree).
import type { Command } from 'commander';

const EXAMPLES: Record<string, string[]> = {
  '': ['blockmirror up -c config/demo.yaml', 'blockmirror status -c config/demo.yaml'],
  serve: ['blockmirror serve --size 1GiB --listen 127.0.0.1:10809', 'nbdinfo nbd://127.0.0.1:10809/disk', 'blockmirror serve --size 1GiB --tls require --tls-psk keys.psk    # psktool -u alice -p keys.psk'],
  up: ['blockmirror up -c config/demo.yaml', 'blockmirror up -c config/two-sites.yaml --only 1     # on the host of storage system 1'],
  status: ['blockmirror status -c config/demo.yaml', 'blockmirror status -c config/demo.yaml --json'],
  apply: ['blockmirror apply -c config/demo.yaml --dry-run    # print what would change', 'blockmirror apply -c config/demo.yaml --wait       # apply it; wait for new mirrors to reach PAIR'],
  pair: ['blockmirror pair split pair1 -c config/demo.yaml'],
  'pair create': ['blockmirror pair create pair3 -c config/demo.yaml --master 1:9 --mirror 1:10 --mode sync --wait'],
  'pair delete': ['blockmirror pair delete pair3 -c config/demo.yaml'],
  'pair split': ['blockmirror pair split pair1 -c config/demo.yaml'],
  'pair resync': ['blockmirror pair resync pair1 -c config/demo.yaml --wait    # a progress bar until the mirrors are in sync'],
  'pair verify': ['blockmirror pair verify pair1 -c config/demo.yaml'],
  'pair swap': ['blockmirror pair swap pair1 -c config/two-sites.yaml'],
  'pair takeover': ['blockmirror pair takeover pair1 -c config/two-sites.yaml    # on the mirror\'s host, the master\'s is gone'],
  cfs: ['blockmirror cfs put video.mp4 /films/ -c config/cfs.yaml'],
  'cfs serve': ['blockmirror cfs serve -c config/cfs.yaml'],
  'cfs put': ['blockmirror cfs put video.mp4 /films/ -c config/cfs.yaml', 'tar c dir | blockmirror cfs put - /backups/dir.tar -c config/cfs.yaml'],
  'cfs get': ['blockmirror cfs get /films/video.mp4 copy.mp4 -c config/cfs.yaml'],
  'cfs cat': ['blockmirror cfs cat /notes.txt -c config/cfs.yaml'],
  'cfs ls': ['blockmirror cfs ls /films -c config/cfs.yaml'],
  'cfs rm': ['blockmirror cfs rm -r /old -c config/cfs.yaml'],
  'cfs mkdir': ['blockmirror cfs mkdir /films -c config/cfs.yaml'],
  'cfs mv': ['blockmirror cfs mv /films/a.mp4 /archive/ -c config/cfs.yaml'],
  'cfs usage': ['blockmirror cfs usage -c config/cfs.yaml'],
  'cfs mount': ['blockmirror cfs mount -c config/cfs.yaml /mnt/cfs'],
  fault: ['blockmirror fault set -c config/demo.yaml 1:6 error --op write'],
  'fault set': ['blockmirror fault set -c config/demo.yaml 1:7 error --op write', 'blockmirror fault set -c config/two-sites.yaml link:1-2 delay --ms 50 --jitter 10'],
  'fault clear': ['blockmirror fault clear -c config/demo.yaml 1:7'],
  'fault list': ['blockmirror fault list -c config/demo.yaml'],
  gateway: ['blockmirror gateway -c config/etcd.yaml --listen 127.0.0.1:10810', 'nbdinfo nbd://127.0.0.1:10810/pair1'],
  etcd: ['blockmirror etcd dump -c config/etcd.yaml'],
  'etcd dump': ['blockmirror etcd dump -c config/etcd.yaml --json'],
  admin: ['blockmirror admin token -c config/demo.yaml'],
  'admin token': ['curl -H "Authorization: Bearer $(blockmirror admin token -c config/demo.yaml)" http://127.0.0.1:9001/api/status', 'chromium "$(blockmirror admin token -c config/demo.yaml --url)"'],
  xfer: ['blockmirror xfer format nbd://127.0.0.1:10809/disk --seg-size 1MiB --segments 64 --max-conn 4'],
  'xfer format': ['blockmirror xfer format nbd://127.0.0.1:10809/disk --seg-size 1MiB --segments 64 --max-conn 4'],
  'xfer send': ['blockmirror xfer send --dev nbd://127.0.0.1:10809/disk --dev nbd://127.0.0.2:10809/disk --from 1 --to 2 backup.tar'],
  'xfer recv': ['blockmirror xfer recv --dev nbd://127.0.0.1:10809/disk --as 2 --out backup.tar'],
  'xfer ls': ['blockmirror xfer ls --dev nbd://127.0.0.1:10809/disk'],
  'xfer gc': ['blockmirror xfer gc --dev nbd://127.0.0.1:10809/disk --timeout 30000'],
  svol: ['blockmirror svol query backup -c cluster.yaml'],
  'svol init': ['blockmirror svol init backup -c cluster.yaml --wait'],
  'svol split': ['blockmirror svol split backup -c cluster.yaml'],
  'svol resync': ['blockmirror svol resync backup --member 3 -c cluster.yaml'],
  'svol restore': ['blockmirror svol restore backup 2 -c cluster.yaml --wait'],
  'svol attr': ['blockmirror svol attr backup 2 RW -c cluster.yaml'],
  'svol verify': ['blockmirror svol verify backup -c cluster.yaml --wait'],
  'svol query': ['blockmirror svol query backup -c cluster.yaml'],
  completion: ['source <(blockmirror completion bash)', 'blockmirror completion bash > /etc/bash_completion.d/blockmirror'],
};

/** The path of a command below the program, e.g. "pair split" ("" for the program itself). */
export function commandPath(cmd: Command): string {
  const names: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) names.unshift(c.name());
  return names.join(' ');
}

/** Every command of the tree, the program first. */
export function allCommands(program: Command): Command[] {
  return [program, ...program.commands.flatMap((c) => allCommands(c))];
}

/** Adds an "Example:" section to every command that has one in the table. */
export function addExamples(program: Command): void {
  for (const cmd of allCommands(program)) {
    const lines = EXAMPLES[commandPath(cmd)];
    if (lines) cmd.addHelpText('after', `\n${lines.length > 1 ? 'Examples' : 'Example'}:\n${lines.map((l) => `  ${l}`).join('\n')}`);
  }
}
