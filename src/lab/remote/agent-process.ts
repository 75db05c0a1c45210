// The lab agent as a program: building its static binary, and running it as
// a local child process (the lab's protocol over this machine's KVM, for
// tests and measurements).
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants as fsc, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HostError, packageRoot } from '../../kvm/sys.js';
import { RemoteAddon, type RemoteOptions } from './addon.js';

export const agentSources = ['agent/main.cc', 'agent/mirror.cc', 'agent/threads.cc', 'core.cc', 'vcpu_thread.cc'].map(
  (f) => join(packageRoot, 'native', f),
);
/** The headers the agent's sources include (a newer one means a rebuild too). */
export const agentHeaders = ['agent/wire.h', 'agent/mirror.h', 'agent/threads.h', 'core.h', 'vcpu_thread.h'].map((f) =>
  join(packageRoot, 'native', f),
);

/** Builds the static agent binary at `out` (g++ -O2 -static -pthread; `cxx` may name a cross compiler). */
export function buildAgent(out: string, cxx = process.env.CXX || 'g++'): string {
  try {
    execFileSync(cxx, ['-O2', '-static', '-std=c++17', '-pthread', '-o', out, ...agentSources], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: Buffer };
    if (err.code === 'ENOENT')
      throw new HostError(
        `building the lab agent needs a C++ compiler: ${cxx} was not found (install g++, or set CXX)`,
      );
    throw new HostError(`building the lab agent failed: ${err.stderr?.toString().trim() || err.message}`);
  }
  return out;
}

export interface AgentProcess {
  child: ChildProcess;
  /** The host's ends: replies are read from readFd (blocking), requests written to writeFd (non-blocking). */
  readFd: number;
  writeFd: number;
  /** Removes the FIFOs; closes the host's ends too unless a Channel owns them (it closes them itself). */
  cleanup(closeFds?: boolean): void;
}

/**
 * Starts the agent as a local child process whose stdin / stdout are FIFOs
 * (Node's own child pipes are sockets that its event loop also reads).
 */
export function spawnAgentProcess(agentPath: string, agentArgs: readonly string[] = []): AgentProcess {
  const dir = mkdtempSync(join(tmpdir(), 'kvmharness-agent-'));
  const fds: number[] = [];
  const closeAll = () => {
    for (const fd of fds.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        /* closed */
      }
    }
  };
  try {
    const req = join(dir, 'req');
    const rep = join(dir, 'rep');
    execFileSync('mkfifo', ['-m', '600', req, rep]);
    // Replies: the host reads with blocking reads. Opening a FIFO for reading
    // blocks until there is a writer; a short-lived O_RDWR holder provides one.
    const keeper = openSync(rep, fsc.O_RDWR);
    fds.push(keeper);
    const readFd = openSync(rep, fsc.O_RDONLY);
    const childWrite = openSync(rep, fsc.O_WRONLY);
    fds.push(childWrite);
    // Requests: the host writes without blocking (a full pipe is waited on
    // with a deadline); the agent makes its end blocking.
    const childRead = openSync(req, fsc.O_RDONLY | fsc.O_NONBLOCK);
    fds.push(childRead);
    const writeFd = openSync(req, fsc.O_WRONLY | fsc.O_NONBLOCK);
    const child = spawn(agentPath, [...agentArgs], { stdio: [childRead, childWrite, 'inherit'] });
    child.on('error', () => {});
    closeAll();
    const host = [readFd, writeFd];
    const cleanup = (closeFds = true) => {
      for (const fd of host.splice(0)) {
        if (!closeFds) continue;
        try {
          closeSync(fd);
        } catch {
          /* closed by the channel */
        }
      }
      rmSync(dir, { recursive: true, force: true });
    };
    if (child.pid === undefined) {
      cleanup();
      throw new HostError(`cannot start the lab agent ${agentPath}`);
    }
    child.unref();
    return { child, readFd, writeFd, cleanup };
  } catch (e) {
    closeAll();
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

export interface LocalAgent {
  addon: RemoteAddon;
  child: ChildProcess;
  /** Ends the agent and removes its FIFOs. */
  close(): void;
}

/** Runs the agent as a local child process and connects to it: the lab's protocol over this machine's KVM. */
export function spawnLocalAgent(agentPath: string, opts: RemoteOptions & { agentArgs?: string[] } = {}): LocalAgent {
  const p = spawnAgentProcess(agentPath, opts.agentArgs);
  let addon: RemoteAddon;
  try {
    addon = RemoteAddon.connect(p.readFd, p.writeFd, { watchPid: p.child.pid, ...opts, ownFds: true });
  } catch (e) {
    p.child.kill('SIGKILL');
    p.cleanup(false); // connect() closed the descriptors
    throw e;
  }
  return {
    addon,
    child: p.child,
    close() {
      addon.disconnect();
      p.cleanup(false);
    },
  };
}
