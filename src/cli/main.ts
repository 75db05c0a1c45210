// kvmharness command line: thin; parsing and exit codes only.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError } from 'commander';
import { SelectionError } from '../checks/suites.js';
import { HostError } from '../kvm/sys.js';
import { LabError } from '../lab/profiles.js';
import { probe } from '../probe/probe.js';
import { formatProfile, profileJson } from '../report/profile.js';
import { ScenarioError } from '../scenario/load.js';
import { localTarget } from '../target/local.js';
import { registerLab } from './lab.js';
import { OutputError } from './output.js';
import { addRunOptions, deviceOption, executeRun, runHelpText, UsageError, type RunCliOptions } from './run.js';
import { registerRepro } from './repro.js';
import { registerWalk, WalkUsageError } from './walk.js';

/** The version in the package's package.json (found above this module, in src/ or dist/src/). */
export function packageVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    dir = dirname(dir);
    const p = join(dir, 'package.json');
    if (!existsSync(p)) continue;
    const pkg = JSON.parse(readFileSync(p, 'utf8')) as { name?: string; version?: string };
    if (pkg.name === 'kvmharness' && pkg.version) return pkg.version;
  }
  return 'unknown';
}

export function program(): Command {
  const p = new Command('kvmharness')
    .description('Drives /dev/kvm, models both dimensions of paging, and cross-checks the model against what KVM did')
    .version(packageVersion(), '-V, --version', 'print the version and exit')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  p.command('probe')
    .description("print this host's KVM profile and the oracles it offers")
    .option('--json', 'print JSON')
    .addOption(deviceOption())
    .action((o: { json?: boolean; device?: string }) => {
      const prof = probe(localTarget, o.device);
      console.log(o.json ? profileJson(prof) : formatProfile(prof));
    });

  addRunOptions(p.command('run').description('run checks against KVM (default: every built-in check)'))
    .addHelpText('after', runHelpText())
    .action(async (names: string[], o: RunCliOptions) => {
      process.exitCode = await executeRun(names, o);
    });

  registerWalk(p);
  registerRepro(p);
  registerLab(p);
  return p;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`kvmharness: ${msg}\n`);
    const expected =
      e instanceof OutputError ||
      e instanceof HostError ||
      e instanceof UsageError ||
      e instanceof SelectionError ||
      e instanceof ScenarioError ||
      e instanceof WalkUsageError ||
      e instanceof LabError;
    if (process.env.KVMHARNESS_DEBUG && e instanceof Error && !expected) process.stderr.write(`${e.stack}\n`);
    return 2;
  }
}
