// The layers of src/ import only downward (.dependency-cruiser.cjs has the order). The second test
// proves the check can fail: a block device that imports the controller is refused, by name.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, run, tmpDir } from './helpers/servers.js';

const DEPCRUISE = path.join(ROOT, 'node_modules/.bin/depcruise');

describe('layers', () => {
  it('has no folder of src/ importing a layer above it', async () => {
    const r = await run(DEPCRUISE, ['src', '--config', '.dependency-cruiser.cjs', '--output-type', 'err'], { cwd: ROOT, timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/no dependency violations found \(\d+ modules/);
  });

  it('names the rule and the files when a lower layer imports a higher one', async () => {
    const dir = tmpDir('bm-layers-');
    fs.mkdirSync(path.join(dir, 'src/blockdev'), { recursive: true });
    fs.mkdirSync(path.join(dir, 'src/controller'), { recursive: true });
    fs.copyFileSync(path.join(ROOT, '.dependency-cruiser.cjs'), path.join(dir, '.dependency-cruiser.cjs'));
    fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({ compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext' } }));
    fs.writeFileSync(path.join(dir, 'src/controller/pair.ts'), 'export const pair = 1;\n');
    fs.writeFileSync(path.join(dir, 'src/blockdev/bad.ts'), "import { pair } from '../controller/pair.js';\nexport const x = pair;\n");
    const r = await run(DEPCRUISE, ['src', '--config', '.dependency-cruiser.cjs', '--output-type', 'err'], { cwd: dir, timeoutMs: 60_000 });
    expect(r.code).not.toBe(0);
    expect(r.stdout).toContain('blockdev-imports-upward');
    expect(r.stdout).toContain('src/blockdev/bad.ts → src/controller/pair.ts');
  });

  it('refuses the transfer layer leaning on its peer, the CFS, and the CFS on the transfer layer', async () => {
    const dir = tmpDir('bm-layers-');
    for (const f of ['xfer', 'cfs', 'cli']) fs.mkdirSync(path.join(dir, 'src', f), { recursive: true });
    fs.copyFileSync(path.join(ROOT, '.dependency-cruiser.cjs'), path.join(dir, '.dependency-cruiser.cjs'));
    fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({ compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext' } }));
    fs.writeFileSync(path.join(dir, 'src/cli/main.ts'), 'export const main = 1;\n');
    fs.writeFileSync(path.join(dir, 'src/cfs/client.ts'), "import { x } from '../xfer/volume.js';\nexport const client = x;\n");
    fs.writeFileSync(path.join(dir, 'src/xfer/volume.ts'), "import { main } from '../cli/main.js';\nexport const x = main;\nexport const y = import('../cfs/client.js');\n");
    const r = await run(DEPCRUISE, ['src', '--config', '.dependency-cruiser.cjs', '--output-type', 'err'], { cwd: dir, timeoutMs: 60_000 });
    expect(r.code).not.toBe(0);
    expect(r.stdout).toContain('xfer-imports-upward');
    expect(r.stdout).toContain('src/xfer/volume.ts → src/cli/main.ts');
    expect(r.stdout).toContain('cfs-imports-sibling');
    expect(r.stdout).toContain('src/cfs/client.ts → src/xfer/volume.ts');
  });
});
