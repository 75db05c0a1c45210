// Writing reports out whole before the process exits, and saying so when that
// fails. Node writes to a pipe asynchronously: a process that exits right
// after write() loses whatever the pipe had not taken yet (64 KiB of a
// 370 KB JSON report), so every report goes through writeStdout and the
// caller waits for it before exiting.
import { writeFileSync } from 'node:fs';

/** A report that could not be written: the run exits 2 with this one line. */
export class OutputError extends Error {}

/** Resolves once `text` has been handed to the kernel whole; a failed write (ENOSPC, EPIPE, ...) rejects with an OutputError. */
export function writeStdout(text: string): Promise<void> {
  const out = process.stdout;
  return new Promise((resolve, reject) => {
    // Stays attached after a failure: the stream emits 'error' after the
    // write's callback, and an unheard 'error' would end the process with a
    // stack trace.
    const fail = (e: Error) => reject(new OutputError(`writing the report to standard output failed: ${e.message}`));
    out.on('error', fail);
    out.write(text, (e) => {
      if (e) return fail(e);
      out.removeListener('error', fail);
      resolve();
    });
  });
}

/** Writes a report file; a failure is an OutputError naming the file. */
export function writeReportFile(path: string, text: string, what: string): void {
  try {
    writeFileSync(path, text);
  } catch (e) {
    throw new OutputError(`writing the ${what} report to ${path} failed: ${(e as Error).message}`);
  }
}
