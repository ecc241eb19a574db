/*
 * /sbin/init of the minimal kernel's ext2 root disk (built by
 * scripts/guest-kernel.sh with gcc -static -nostdlib; no C library). It
 * proves a user space runs and its system calls reach the kernel: it
 * prints the time (CLOCK_REALTIME, which the kernel set from the CMOS
 * RTC), appends a line to /devplane-boots and syncs it to the disk, then
 * restarts the machine (reboot=k: through the i8042, which ends the VM).
 * Every line the host checks starts with DEVPLANE-.
 */
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_fsync 74
#define SYS_sync 162
#define SYS_reboot 169
#define SYS_clock_gettime 228
#define O_WRONLY 01
#define O_CREAT 0100
#define O_APPEND 02000
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static unsigned long len(const char *s)
{
	unsigned long n = 0;
	while (s[n])
		n++;
	return n;
}

static void say(const char *s)
{
	sys3(SYS_write, 1, (long)s, (long)len(s));
}

/* "DEVPLANE-USER-TIME <seconds>\n" */
static void say_time(void)
{
	long ts[2] = { 0, 0 };
	char buf[64] = "DEVPLANE-USER-TIME ";
	char digits[24];
	unsigned long v, i = 0, at = len(buf);

	if (sys3(SYS_clock_gettime, 0, (long)ts, 0) != 0) {
		say("DEVPLANE-USER-TIME-FAILED\n");
		return;
	}
	v = (unsigned long)ts[0];
	do {
		digits[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i < sizeof digits);
	while (i)
		buf[at++] = digits[--i];
	buf[at++] = '\n';
	buf[at] = 0;
	say(buf);
}

/* The kernel enters with RSP 16-byte aligned, not as after a call. */
__attribute__((force_align_arg_pointer)) void _start(void)
{
	static const char line[] = "booted\n";
	long fd;

	say("DEVPLANE-USER-INIT\n");
	say_time();
	fd = sys3(SYS_open, (long)"/devplane-boots", O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd >= 0 && sys3(SYS_write, fd, (long)line, sizeof line - 1) == sizeof line - 1 &&
	    sys3(SYS_fsync, fd, 0, 0) == 0) {
		sys3(SYS_close, fd, 0, 0);
		/* ext2's fsync leaves a new file's directory entry in memory. */
		sys3(SYS_sync, 0, 0, 0);
		say("DEVPLANE-USER-SYNCED\n");
	} else {
		say("DEVPLANE-USER-DISK-FAILED\n");
	}
	sys3(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART);
	for (;;)
		;
}
