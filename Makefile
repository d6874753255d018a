# make dist: static, reproducible sluice binaries for every firmware
# profile's target and a .deb per Debian architecture, in dist/.
# make test: the whole test suite, as CI runs it.
.PHONY: dist test clean

dist:
	scripts/dist.sh

test:
	./test.sh

clean:
	rm -rf dist
