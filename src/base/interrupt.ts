// How the process ends on a signal. Clean-ups (tracefs instances) run on every
// exit path; on SIGINT, SIGTERM, SIGHUP, SIGQUIT or SIGUSR2 they run first,
// then the finisher a run has registered (it prints the report of what was
// checked, the rest marked not run), then the process exits 128 + the
// signal's number. A second signal while the finisher runs exits at once.
// SIGKILL runs nothing: the next run removes what it left (tracefs.ts).

/** Exit status per signal: 128 + its number. */
export const SIGNAL_EXIT = { SIGHUP: 129, SIGINT: 130, SIGQUIT: 131, SIGUSR2: 140, SIGTERM: 143 } as const;
export type ExitSignal = keyof typeof SIGNAL_EXIT;

const cleanups = new Set<() => void>();
let finisher: ((signal: ExitSignal) => Promise<void>) | undefined;
let hooked = false;
let ending = false;

function cleanUp(): void {
  for (const c of cleanups) {
    try {
      c();
    } catch {
      // each clean-up does what it can; the others still run
    }
  }
}

/** Runs `fn` on process exit and before the finisher on a signal; returns its removal. */
export function onCleanup(fn: () => void): () => void {
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

/**
 * While a run is under way: what to do on a signal before exiting (print the
 * report so far). One at a time; returns its removal.
 */
export function onInterrupt(fn: (signal: ExitSignal) => Promise<void>): () => void {
  finisher = fn;
  return () => {
    if (finisher === fn) finisher = undefined;
  };
}

/**
 * Installs the exit and signal handlers (once). Programs call this at
 * start-up so that no signal can arrive between creating something to clean
 * up and hooking its removal.
 */
export function hookSignals(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', cleanUp);
  for (const sig of Object.keys(SIGNAL_EXIT) as ExitSignal[]) {
    process.on(sig, () => void onSignal(sig));
  }
}

async function onSignal(sig: ExitSignal): Promise<void> {
  if (ending) process.exit(SIGNAL_EXIT[sig]);
  ending = true;
  cleanUp();
  const finish = finisher;
  finisher = undefined;
  if (finish) {
    try {
      await finish(sig);
    } catch (e) {
      process.stderr.write(`kvmharness: ${e instanceof Error ? e.message : String(e)}\n`);
    }
  }
  process.exit(SIGNAL_EXIT[sig]);
}
