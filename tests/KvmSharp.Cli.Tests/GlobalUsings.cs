global using Xunit;
global using KvmSharp.Images.Tests;
