// `kvmharness repro SCENARIO [--out FILE.c] [--run]`: the standalone C
// reproducer of a scenario (src/fuzz/repro-c.ts) for this host, written out,
// and with --run built with gcc and run.
import type { Command } from 'commander';
import { NotApplicable } from '../base/not-applicable.js';
import { buildAndRun, reproducer, ReproUnsupported } from '../fuzz/repro-c.js';
import { probe } from '../probe/probe.js';
import { loadScenario, resolveScenario } from '../scenario/load.js';
import { localTarget } from '../target/local.js';
import { writeReportFile, writeStdout } from './output.js';
import { deviceOption, UsageError } from './run.js';

interface ReproCliOptions {
  out?: string;
  run?: boolean;
  device?: string;
}

/** Exit statuses of `repro --run`: the program's own (0, 1, 4 = KSFT_SKIP), else 2. */
export function reproHelpText(): string {
  return [
    '',
    'The program exits 0 when KVM does what the models predict, 1 at the first mismatch (one line naming',
    'the step and the field), 2 when a system call fails, 4 (KSFT_SKIP) when this host cannot run it.',
    'With --run, `repro` builds it with gcc -Wall -Werror, runs it, and exits with its status (2 if it',
    'does not build).',
  ].join('\n');
}

export async function executeRepro(arg: string, o: ReproCliOptions): Promise<number> {
  const sc = loadScenario(resolveScenario(arg));
  const profile = probe(localTarget, o.device);
  let r;
  try {
    r = reproducer(sc, { profile });
  } catch (e) {
    if (e instanceof ReproUnsupported) throw new UsageError(`cannot write a C reproducer: ${e.message}`);
    if (e instanceof NotApplicable) throw new UsageError(`${sc.name}: not applicable here: ${e.message}`);
    throw e;
  }
  for (const line of r.omitted) process.stderr.write(`repro: not carried: ${line}\n`);
  if (o.out) writeReportFile(o.out, r.source, 'C reproducer');
  else if (!o.run) await writeStdout(r.source);
  if (!o.run) return 0;
  const res = await buildAndRun(r.source);
  process.stdout.write(res.stdout);
  process.stderr.write(res.stderr);
  if (res.exitCode < 0) {
    process.stderr.write('kvmharness: the C reproducer did not build or was killed\n');
    return 2;
  }
  return res.exitCode;
}

/** Adds the `repro` command. */
export function registerRepro(program: Command): Command {
  return program
    .command('repro')
    .description("write a scenario's standalone C reproducer for this host (libc and <linux/kvm.h> only)")
    .argument('<scenario>', 'scenario file, or the name of a built-in scenario')
    .option('--out <file>', 'write the C program to FILE (default: standard output)')
    .option('--run', 'build it with gcc and run it; exit with its status')
    .addOption(deviceOption())
    .addHelpText('after', reproHelpText())
    .action(async (file: string, o: ReproCliOptions) => {
      process.exitCode = await executeRepro(file, o);
    });
}
