#!/usr/bin/env node
import { main } from './main.js';
import { hookExit } from '../observe/tracefs.js';

// Exit paths (including Ctrl-C) remove what the run created; hooked before
// anything is created.
hookExit();

main(process.argv.slice(2)).then((code) => process.exit(code));
